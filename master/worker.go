package master

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/handoff"
	"github.com/gorolling/gorolling/master/events"
	"github.com/gorolling/gorolling/master/notify"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// workerState is where a worker is in its life.
type workerState int

// Worker states.
const (
	// workerStarting: spawned, not ready yet.
	workerStarting workerState = iota
	// workerReadyState: said it is ready (handoff "ready" or READY=1).
	workerReadyState
	// workerDraining: told to drain; finishing what it has.
	workerDraining
	// workerExitedState: reaped.
	workerExitedState
)

// String names the state as status shows it.
func (s workerState) String() string {
	switch s {
	case workerStarting:
		return "starting"
	case workerReadyState:
		return "ready"
	case workerDraining:
		return "draining"
	case workerExitedState:
		return "exited"
	}
	return "unknown"
}

// Limits on what one worker may cost the master.
const (
	// maxKeysPerWorker bounds the sockets one worker may ask for; past it
	// a listen gets EMFILE.
	maxKeysPerWorker = 256
	// The handoff channel is read at up to requestRate requests a second
	// after a burst of requestBurst; a faster worker is read more slowly
	// (its sends then wait), not stopped.
	requestRate  = 100
	requestBurst = 300
	// sendTimeout bounds a reply: a worker that stops reading its channel
	// for that long is stopped.
	sendTimeout = 5 * time.Second
)

// child is the master's handle on one worker process. Its mutable fields
// are guarded by the master's mutex.
type child struct {
	// ID is unique for the service's life and never reused.
	ID int
	// Slot is the worker's slot in its generation, 0..N-1.
	Slot int

	gen       *Generation
	m         *Master
	proc      process
	pid       int
	conn      *handoff.Conn
	notify    *notify.Socket
	log       hclog.Logger
	spawnedAt time.Time // just before fork
	done      chan struct{}

	state    workerState
	readyAt  time.Time
	keys     map[handoff.Key]struct{}
	violated bool
	killer   timer           // the SIGKILL a drain or a violation scheduled
	status   string          // the last STATUS= the worker sent
	statusAt time.Time       // when a STATUS= was last logged at info level
	logged   map[string]bool // warnings already logged once for this worker
	output   [2]*os.File     // the relay's read ends (Config.Output), or nil

	// Connection relay (relay.go).
	conns   bool               // said in its hello that it may hand connections over
	socks   map[string]sockRef // the sockets it got, by the key string of the listen reply
	adopts  map[string]bool    // the keys it adopts connections for
	adopted int                // connections it took
	pending int                // connections offered to it and not decided yet
	offers  chan struct{}      // its offers in flight (capacity maxOffers)
}

// spawn starts one worker in slot s of g and makes it the slot's worker
// before it can ask for anything, so that a collection sees its sockets
// from its first request. Called without m.mu held.
func (m *Master) spawn(g *Generation, s *slot) (*child, error) {
	slot := s.index
	conn, wf, err := handoff.Pair()
	if err != nil {
		return nil, err
	}
	conn.SetWriteTimeout(sendTimeout)
	// A worker has no descriptor to give the master; on kernels that can,
	// refuse them outright (older ones: serve discards what arrives).
	_ = conn.RefuseDescriptors()
	m.mu.Lock()
	m.nextID++
	id := m.nextID
	m.mu.Unlock()
	fail := func(err error, files ...*os.File) (*child, error) {
		for _, f := range files {
			f.Close()
		}
		conn.Close()
		wf.Close()
		return nil, err
	}
	ns, err := notify.Open(m.runDir, id, m.cfg.Account)
	if err != nil {
		return fail(err)
	}
	preopened := m.reg.Preopened()
	extra := []string{
		"GOROLLING_FD=" + strconv.Itoa(3+len(preopened)),
		"GOROLLING_SLOT=" + strconv.Itoa(slot),
		"GOROLLING_WORKER_ID=" + strconv.Itoa(id),
		"GOROLLING_GENERATION=" + strconv.Itoa(g.Num),
		"NOTIFY_SOCKET=" + ns.Path(),
	}
	path, args := g.path, append([]string{m.cfg.Program}, m.cfg.Args...)
	var files []*os.File
	if len(preopened) > 0 {
		names := make([]string, len(preopened))
		for i, p := range preopened {
			names[i] = p.Name
			// A fresh duplicate wrapped by os.NewFile: its Fd(), which
			// starting the process calls, leaves O_NONBLOCK alone (it
			// would switch a File that set non-blocking mode itself to
			// blocking, for every holder of the socket).
			d, err := p.Dup()
			if err != nil {
				ns.Close()
				return fail(fmt.Errorf("pass %s to a worker: %w", p.Addr, err), files...)
			}
			files = append(files, os.NewFile(uintptr(d), p.Name))
		}
		extra = append(extra, "LISTEN_FDS="+strconv.Itoa(len(files)), "LISTEN_FDNAMES="+strings.Join(names, ":"))
		// LISTEN_PID must be the worker's own pid, which is unknown
		// before the fork: the shim sets it and execs the program in
		// place, so the program keeps that pid.
		path = m.cfg.Shim[0]
		args = append(append(append([]string{}, m.cfg.Shim...), g.path), args...)
	}
	w := &child{
		ID: id, Slot: slot, gen: g, m: m, conn: conn, notify: ns,
		done:   make(chan struct{}),
		keys:   make(map[handoff.Key]struct{}),
		logged: make(map[string]bool),
		socks:  make(map[string]sockRef),
		adopts: make(map[string]bool),
		offers: make(chan struct{}, maxOffers),
	}
	w.spawnedAt = m.cfg.clock.now()
	stdout, stderr, relayed, err := m.outputPipes()
	if err != nil {
		ns.Close()
		return fail(err, files...)
	}
	proc, err := m.cfg.start(procSpec{
		Path: path, Args: args, Env: workerEnv(m.cfg.env, extra...), Dir: g.dir,
		Files: append(files, wf), Cred: m.cfg.Account.Credential(),
		Stdout: stdout, Stderr: stderr,
	})
	for _, f := range files {
		f.Close()
	}
	wf.Close() // the master's end sees EOF once the worker is gone
	if relayed[0] != nil {
		// The write ends are the worker's now: the relay sees end of
		// file once the worker and what it left running have closed them,
		// or stops 1 s after the worker exited (wait).
		stdout.Close()
		stderr.Close()
	}
	if err != nil {
		for _, r := range relayed {
			if r != nil {
				r.Close()
			}
		}
		ns.Close()
		conn.Close()
		return nil, fmt.Errorf("start %s: %w", m.cfg.Program, err)
	}
	w.proc, w.pid = proc, proc.Pid()
	w.output = relayed
	m.relay(relayed, w)
	w.log = m.log.With("generation", g.Num, "slot", slot, "pid", w.pid, "worker_id", id)
	m.mu.Lock()
	if prev := s.w; prev != nil {
		// The predecessor's sockets stay held until this worker is ready:
		// it will most likely ask for the same ones.
		s.pinned = prev.keys
	}
	s.w = w
	g.running[w] = struct{}{}
	if g.state >= genDraining || !g.hasSlotLocked(s) {
		// A drain began, or a scale-down removed the slot, while we forked.
		m.drainLocked(w)
	}
	m.notifyLocked()
	m.mu.Unlock()
	w.log.Info("worker online", events.Key, events.WorkerOnline)
	go w.serve()
	go ns.Serve(w.pid, notifyHandler{w})
	go w.wait()
	if d := m.cfg.ReadyTimer; d > 0 {
		m.cfg.clock.afterFunc(d, func() { m.workerReady(w, "timer") })
	}
	return w, nil
}

// wait reaps the worker and tells its generation.
func (w *child) wait() {
	desc, _ := w.proc.Wait()
	if w.output[0] != nil {
		// A process the worker left behind may hold its output pipes for
		// ever; the relay must not, or a worker that crash-loops leaving
		// orphans would grow the master by two descriptors and two
		// goroutines per crash. What the worker wrote before it exited is
		// in the pipe already: a moment is enough to relay it.
		out := w.output
		time.AfterFunc(outputGrace, func() {
			out[0].Close()
			out[1].Close()
		})
	}
	// Close the master's end now: a listener fd still unread in the
	// channel's buffer stays referenced until then. The closes run on their
	// own goroutine: on kernels that cannot refuse a worker's descriptors,
	// closing a channel that still queues one runs that descriptor's final
	// close, which a hostile worker can make block.
	go func() {
		w.conn.Close()
		w.notify.Close()
	}()
	w.m.mu.Lock()
	if w.killer != nil {
		w.killer.Stop()
	}
	w.m.mu.Unlock()
	w.m.workerExited(w, desc)
	// Sockets only this worker's predecessors held are closed now, not at
	// the next drain: a worker that crash-loops asking for new addresses
	// must not make the master hold ever more.
	w.m.collect()
}

// drainLocked tells w to drain: the drain message, then the stop signal,
// then SIGKILL if it is still running after the drain timeout. Called with
// m.mu held; a no-op for a worker already draining or gone.
func (m *Master) drainLocked(w *child) {
	if w.state == workerDraining || w.state == workerExitedState {
		return
	}
	w.state = workerDraining
	w.log.Info("worker draining")
	if w.conns {
		// From now on it may hand its connections over: let the kernel
		// pass its descriptors (refused until now where the kernel can).
		_ = w.conn.AllowDescriptors()
	}
	go func() {
		err := w.conn.Send(&handoff.Message{V: handoff.Version, Type: handoff.TypeDrain, TimeoutMS: m.cfg.DrainTimeout.Milliseconds()})
		if err != nil {
			w.log.Debug("drain message not delivered", "error", err)
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		m.stopWithinLocked(w, m.cfg.StopSignal, m.cfg.DrainTimeout)
	}()
}

// stopWithinLocked sends w sig now and SIGKILL after d, unless it has
// exited by then. Called with m.mu held.
func (m *Master) stopWithinLocked(w *child, sig syscall.Signal, d time.Duration) {
	if w.state == workerExitedState {
		return
	}
	w.proc.Signal(sig)
	if w.killer != nil {
		return
	}
	w.killer = m.cfg.clock.afterFunc(d, func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		if w.state != workerExitedState {
			w.log.Warn("worker still running after the drain timeout; killing it", events.Key, events.WorkerKilled)
			w.proc.Signal(syscall.SIGKILL)
		}
	})
}

// serve reads the worker's requests until the channel closes.
func (w *child) serve() {
	var lastSeq uint64
	helloSeen := false
	lim := rate.NewLimiter(requestRate, requestBurst)
	for {
		msg, fds, err := w.conn.Receive()
		if err != nil {
			if errors.Is(err, io.EOF) {
				w.log.Debug("worker closed its handoff channel")
				return
			}
			if errors.Is(err, net.ErrClosed) || w.exited() {
				return
			}
			w.violation(err.Error())
			return
		}
		if len(fds) > 0 && !(msg.Type == handoff.TypeHandoff && len(fds) == 1) {
			handoff.Discard(fds)
			w.violation(fmt.Sprintf("sent %d file descriptors with a %q message", len(fds), msg.Type))
			return
		}
		if msg.Type == handoff.TypeHandoff && len(fds) != 1 {
			w.violation("sent a handoff without a descriptor")
			return
		}
		// Offers and accepts are bounded by the relay's window and by the
		// connections offered to this worker, not by the request rate: a
		// drain hands every connection over at once.
		received := time.Now()
		if msg.Type != handoff.TypeHandoff && !(msg.Type == handoff.TypeAccept && w.offeredTo(msg.Conn)) {
			if d := lim.Reserve().Delay(); d > 0 {
				w.warnOnce("flood", "worker sends requests faster than the master reads them; reading its channel more slowly", events.Key, events.WorkerThrottled, "channel", "handoff", "rate_per_second", requestRate)
				time.Sleep(d)
			}
		}
		if !handoff.IsRequest(msg.Type) {
			handoff.Discard(fds)
			w.violation(fmt.Sprintf("sent a %q message, which only the master sends", msg.Type))
			return
		}
		if msg.Seq <= lastSeq {
			handoff.Discard(fds)
			w.violation(fmt.Sprintf("sequence number %d after %d", msg.Seq, lastSeq))
			return
		}
		lastSeq = msg.Seq
		reply := &handoff.Message{V: handoff.Version, Type: handoff.TypeReply, ReplyTo: msg.Seq}
		sendFD := -1
		switch msg.Type {
		case handoff.TypeHello:
			if helloSeen {
				w.violation("sent hello twice")
				return
			}
			helloSeen = true
			w.m.mu.Lock()
			w.conns = msg.Conns
			w.m.mu.Unlock()
			reply.Features = []string{handoff.FeatureConns}
		case handoff.TypeListen:
			sendFD = w.listen(msg.Listen, reply)
		case handoff.TypeReady:
			w.m.workerReady(w, "handoff")
		case handoff.TypeAdopt:
			w.adopt(msg.Key, reply)
		case handoff.TypeHandoff:
			// It replies when the relay is decided.
			if !w.offer(msg, fds[0], received) {
				w.violation("handed over a descriptor that is not a socket")
				return
			}
			continue
		case handoff.TypeAccept:
			if !w.accept(msg, reply) {
				w.violation(fmt.Sprintf("accepted connection %d, which was not offered to it", msg.Conn))
				return
			}
		}
		var serr error
		if sendFD >= 0 {
			serr = w.conn.Send(reply, sendFD)
			unix.Close(sendFD)
		} else {
			serr = w.conn.Send(reply)
		}
		switch {
		case serr == nil:
		case errors.Is(serr, os.ErrDeadlineExceeded):
			w.violation("stopped reading its handoff channel")
			return
		case w.exited(), errors.Is(serr, syscall.ECONNRESET), errors.Is(serr, syscall.EPIPE), errors.Is(serr, net.ErrClosed):
			return // gone
		default:
			w.violation("its channel failed: " + serr.Error())
			return
		}
	}
}

// listen answers one listen request, filling reply. It returns the fd to
// attach (owned by the caller), or -1 for none.
func (w *child) listen(req *handoff.ListenRequest, reply *handoff.Message) int {
	k, err := handoff.Normalize(req)
	if err != nil {
		reply.Error = err.Error()
		reply.Errno = handoff.ErrnoName(err)
		if reply.Errno == "" {
			reply.Errno = "EINVAL"
		}
		return -1
	}
	// The keys are recorded before the socket is acquired, so that a
	// collection running meanwhile keeps the socket.
	keys := []handoff.Key{k}
	if mk, ok := w.m.reg.MemberKey(k, w.Slot); ok {
		keys = append(keys, mk) // this slot's member of a reuseport group
	}
	w.m.mu.Lock()
	_, known := w.keys[k]
	if !known && w.requestedLocked() >= maxKeysPerWorker {
		w.m.mu.Unlock()
		reply.Error = fmt.Sprintf("listen %s: this worker already holds %d sockets, the most one worker may ask for", k, maxKeysPerWorker)
		reply.Errno = "EMFILE"
		w.warnOnce("keys", "listen refused: the worker holds too many sockets", events.Key, events.ListenRefused, "limit", maxKeysPerWorker)
		return -1
	}
	var added []handoff.Key
	for _, x := range keys {
		if _, ok := w.keys[x]; !ok {
			w.keys[x] = struct{}{}
			added = append(added, x)
		}
	}
	w.m.mu.Unlock()
	// The registry opens a socket it does not hold yet with the worker's
	// own credentials, so the kernel decides what it may bind; sockets the
	// operator declared (--listen) or handed in are shared as they are.
	fd, s, err := w.m.reg.Acquire(k, w.Slot)
	if err != nil {
		w.m.mu.Lock()
		for _, x := range added {
			delete(w.keys, x)
		}
		w.m.mu.Unlock()
		reply.Error = err.Error()
		reply.Errno = handoff.ErrnoName(err)
		if errors.Is(err, unix.ENFILE) {
			w.warnOnce("max-sockets", "listen refused: the master holds --max-sockets sockets", events.Key, events.ListenRefused, "key", k.String(), "error", err)
		} else {
			w.warnOnce("listen:"+reply.Errno, "listen failed", events.Key, events.ListenFailed, "key", k.String(), "error", err)
		}
		return -1
	}
	reply.Network, reply.Address, reply.Key = s.Network, s.Addr, k.String()
	w.m.mu.Lock()
	w.socks[reply.Key] = newSockRef(s.Network, s.Addr)
	w.m.mu.Unlock()
	w.log.Debug("listener handed over", events.Key, events.ListenerHandedOver, "key", s.Key.String(), "addr", s.Addr)
	return fd
}

// requestedLocked counts the sockets w asked for: its keys, not counting
// the reuseport members that come with them. Called with m.mu held.
func (w *child) requestedLocked() int {
	n := 0
	for k := range w.keys {
		if k.Member == 0 {
			n++
		}
	}
	return n
}

// warnOnce logs a warning the first time what happens to this worker, and
// never again: a worker repeating a refused request must not flood the
// master's log (the worker itself gets every error).
func (w *child) warnOnce(what, msg string, args ...any) {
	w.m.mu.Lock()
	first := !w.logged[what]
	w.logged[what] = true
	w.m.mu.Unlock()
	if first {
		w.log.Warn(msg, args...)
	}
}

// violation logs a protocol violation and stops the worker: the stop
// signal now, SIGKILL after the drain timeout.
func (w *child) violation(reason string) {
	w.m.mu.Lock()
	if w.violated || w.state == workerExitedState {
		w.m.mu.Unlock()
		return
	}
	w.violated = true
	w.m.stopWithinLocked(w, w.m.cfg.StopSignal, w.m.cfg.DrainTimeout)
	w.m.mu.Unlock()
	w.log.Error("worker broke the handoff protocol; stopping it", events.Key, events.WorkerViolation, "reason", reason)
	w.conn.Close()
}

func (w *child) exited() bool {
	w.m.mu.Lock()
	defer w.m.mu.Unlock()
	return w.state == workerExitedState
}

// notifyHandler applies what a worker says on its notify socket.
type notifyHandler struct{ w *child }

func (h notifyHandler) Ready() { h.w.m.workerReady(h.w, "notify") }

// statusLogEvery bounds how often one worker's STATUS= reaches the log at
// info level; the others go to debug (status always shows the latest).
const statusLogEvery = 10 * time.Second

func (h notifyHandler) Status(text string) {
	m := h.w.m
	now := m.cfg.clock.now()
	m.mu.Lock()
	changed := h.w.status != text
	h.w.status = text
	loud := changed && now.Sub(h.w.statusAt) >= statusLogEvery
	if loud {
		h.w.statusAt = now
	}
	m.mu.Unlock()
	switch {
	case loud:
		h.w.log.Info("worker status", events.Key, events.WorkerStatus, "status", text)
	case changed:
		h.w.log.Debug("worker status", events.Key, events.WorkerStatus, "status", text)
	}
}

func (h notifyHandler) Stopping(sender int) {
	h.w.log.Info("worker stopping", "sender_pid", sender)
}

func (h notifyHandler) Throttled() {
	h.w.warnOnce("notify-flood", "worker floods its notify socket; reading it more slowly", events.Key, events.WorkerThrottled, "channel", "notify", "rate_per_second", notify.Rate)
}

func (h notifyHandler) Violation(reason string) { h.w.violation(reason) }

func (h notifyHandler) Ignored(reason string, sender int) {
	h.w.warnOnce("notify-ignored:"+reason, "notify message ignored", events.Key, events.WorkerNotifyIgnored, "reason", reason, "sender_pid", sender)
}
