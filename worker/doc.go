// Package worker is what a Go server imports to run under gorolling. It owns
// the worker's side of the handoff channel: asking the master for shared
// listening sockets (Listen, ListenPacket, ListenFD), saying when the server
// is ready (Ready), learning when to stop (Draining, Context, HandleSignals),
// the worker's identity (Slot, ID, Generation), moving open connections to
// the next generation (HandOff, Adopt, Conn), and an HTTP helper that hands
// its keep-alive connections over when it drains, or drains them without
// failing a client where they cannot move (ServeHTTP).
//
// The listen semantics are those of Node's cluster module: the master opens
// each socket once and hands every worker a duplicate (with the master's
// default --spread even, each slot of a TCP listen gets its own socket of
// one SO_REUSEPORT group, which the master deals connections to in turn;
// the worker sees a listener either way); the k-th listen on port 0 gets the same port in every
// worker and every later generation; a failed bind returns the real errno;
// Exclusive listens and listeners the program opens itself are not shared.
// The master keeps its own copy of every socket while any generation uses
// it, so an upgrade never closes a socket and never loses a queued
// connection.
//
// Outside gorolling every call falls back to plain net behaviour: Listen is
// net.Listen (or the matching socket of systemd's socket activation),
// Ready sends READY=1 to $NOTIFY_SOCKET if there is one, and Draining
// closes on a signal once HandleSignals was called. One binary therefore
// runs both ways.
//
// Importing the package does nothing. The first call of any of its
// functions reads the environment and marks the descriptors the master
// passed (the handoff channel, LISTEN_FDS sockets) close-on-exec; call one
// before starting child processes, or they inherit those descriptors.
//
// Signals are the program's: the package installs handlers only when asked
// (HandleSignals, which ServeHTTP calls unless HTTPOptions.OwnSignals is
// set). The master sends its stop signal, SIGTERM by default, right after
// the drain message, so a worker must not die of it.
//
// Every listen error is a *net.OpError whose Err unwraps to the errno where
// there is one (errors.Is(err, syscall.EADDRINUSE)).
//
// The package never calls Fd() on a shared socket (that would switch it to
// blocking mode for every worker), closes the *os.File it converts, and
// marks every descriptor it receives close-on-exec.
package worker
