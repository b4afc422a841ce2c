// Package master supervises a gorolling master's workers: generations of N
// slots, spawning and reaping worker processes, answering their handoff
// channel (listen requests go to the registry), readiness, crash respawn
// with backoff, draining and the final stop. It does not decide when
// generations roll over (the upgrade package does, through
// StartGeneration, Generation.WaitReady, Promote and Generation.Drain), it
// does not own the sockets (the registry does), and it does not catch
// signals (the command wires those).
//
// Invariants:
//   - A worker receives exactly its stdio, its pre-opened sockets and its
//     handoff channel; every descriptor of the master is close-on-exec.
//   - A worker is reaped by exactly one goroutine, the one that waits for
//     its process. There is no global SIGCHLD reaper and no subreaper,
//     except as pid 1 (Config.ReapOrphans), where the goroutine that forks
//     also reaps orphans: zombie children it did not start.
//   - Workers run in their own process group, so a terminal's Ctrl-C
//     reaches only the master, which stops them in order.
//   - A slot of the serving generation is always either running a worker
//     or waiting for the backoff to respawn one; a starting generation's
//     worker that exits fails the generation instead.
//   - A worker that breaks the handoff protocol is logged and stopped; the
//     master neither panics nor leaks the descriptors it received.
//   - A socket stays in the registry while any worker of a live generation
//     holds it, or the last worker of a slot that waits for its respawn.
package master
