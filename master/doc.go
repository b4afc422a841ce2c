// Package master owns what a gorolling master process holds: the listener
// registry (one socket per listen key, opened on the first request and
// duplicated to every worker), the worker processes and their slots,
// spawning and reaping, crash respawn with backoff, draining, signals and
// the final stop. It does not decide when generations roll over: the
// upgrade package does, through StartGeneration, Generation.WaitReady,
// Promote and Generation.Drain.
//
// Invariants:
//   - Every descriptor the master holds is close-on-exec; a worker receives
//     exactly its stdio, its pre-opened sockets and its handoff channel.
//   - The master never calls Fd() on a shared socket: sockets are kept as
//     raw descriptors (not registered with the runtime poller) and handed
//     to workers over SCM_RIGHTS, which leaves O_NONBLOCK alone.
//   - Unix socket files the master creates are never unlinked by a close;
//     the master removes them at its final stop, or when it closes a
//     socket that no live worker holds any more.
//   - A worker is reaped by exactly one goroutine calling Wait; there is no
//     global SIGCHLD reaper and no subreaper.
//   - Workers run in their own process group, so a terminal's Ctrl-C
//     reaches only the master, which then stops them in order.
//   - A worker that breaks the handoff protocol is logged and stopped; the
//     master neither panics nor leaks the descriptors it sent.
package master
