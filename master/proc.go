package master

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/handoff"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// WorkerState is where a worker is in its life.
type WorkerState int

// Worker states.
const (
	// WorkerStarting: spawned, not ready yet.
	WorkerStarting WorkerState = iota
	// WorkerReady: said it is ready (handoff "ready" or READY=1).
	WorkerReady
	// WorkerDraining: told to drain; finishing what it has.
	WorkerDraining
	// WorkerExited: reaped.
	WorkerExited
)

// String names the state as status shows it.
func (s WorkerState) String() string {
	switch s {
	case WorkerStarting:
		return "starting"
	case WorkerReady:
		return "ready"
	case WorkerDraining:
		return "draining"
	case WorkerExited:
		return "exited"
	}
	return "unknown"
}

// Limits on what one worker may cost the master.
const (
	// maxKeysPerWorker bounds the sockets one worker may ask for; past it
	// a listen gets EMFILE.
	maxKeysPerWorker = 256
	// The handoff channel is read at up to floodRate requests a second,
	// after a burst of floodBurst; a faster worker is read more slowly
	// (its sends then wait), not stopped.
	floodBurst = 300
	floodRate  = 100
	// sendTimeout bounds a reply: a worker that stops reading its channel
	// for that long is stopped.
	sendTimeout = 5 * time.Second
)

// Worker is the master's handle on one worker process. Its mutable fields
// are guarded by the master's mutex.
type Worker struct {
	// ID is unique for the master's life and never reused.
	ID int
	// Slot is the worker's slot in its generation, 0..N-1.
	Slot int

	gen       *Generation
	m         *Master
	cmd       *exec.Cmd
	pid       int
	conn      *handoff.Conn
	notify    *notifySock
	log       hclog.Logger
	spawnedAt time.Time // just before fork
	done      chan struct{}

	state    WorkerState
	readyAt  time.Time
	keys     map[handoff.Key]struct{}
	exitDesc string
	exitCode int
	violated bool
	status   string          // the last STATUS= the worker sent
	logged   map[string]bool // warnings already logged once for this worker
}

// PID returns the worker's process id.
func (w *Worker) PID() int { return w.pid }

// spawn starts one worker in slot of g. Called without m.mu held.
func (m *Master) spawn(g *Generation, slot int) (*Worker, error) {
	conn, wf, err := handoff.Pair()
	if err != nil {
		return nil, err
	}
	conn.SetWriteTimeout(sendTimeout)
	m.mu.Lock()
	m.nextID++
	id := m.nextID
	m.mu.Unlock()

	notify, err := m.openNotify(id)
	if err != nil {
		conn.Close()
		wf.Close()
		return nil, err
	}
	chanFD := 3 + len(m.preopened)
	extra := []string{
		"GOROLLING_FD=" + strconv.Itoa(chanFD),
		"GOROLLING_SLOT=" + strconv.Itoa(slot),
		"GOROLLING_WORKER_ID=" + strconv.Itoa(id),
		"GOROLLING_GENERATION=" + strconv.Itoa(g.Num),
		"NOTIFY_SOCKET=" + notify.path,
	}
	path, args := g.Path, append([]string{m.cfg.Program}, m.cfg.Args...)
	var files []*os.File
	if len(m.preopened) > 0 {
		names := make([]string, len(m.preopened))
		for i, s := range m.preopened {
			names[i] = s.Name
			// A fresh duplicate wrapped by os.NewFile: its Fd() (which
			// StartProcess calls) leaves O_NONBLOCK alone (PITFALLS #7).
			d, err := unix.FcntlInt(uintptr(s.fd), unix.F_DUPFD_CLOEXEC, 0)
			if err != nil {
				for _, f := range files {
					f.Close()
				}
				conn.Close()
				wf.Close()
				notify.close()
				return nil, fmt.Errorf("dup %s: %w", s.Addr, err)
			}
			files = append(files, os.NewFile(uintptr(d), s.Name))
		}
		extra = append(extra, "LISTEN_FDS="+strconv.Itoa(len(files)), "LISTEN_FDNAMES="+strings.Join(names, ":"))
		// LISTEN_PID must be the worker's own pid, unknown before fork:
		// the shim sets it and execs the program (PITFALLS #4).
		path = m.cfg.Shim[0]
		args = append(append(append([]string{}, m.cfg.Shim...), g.Path), args...)
	}
	cmd := &exec.Cmd{
		Path:   path,
		Args:   args,
		Env:    WorkerEnv(m.cfg.Env, extra...),
		Dir:    m.cfg.Dir,
		Stdout: m.cfg.Stdout,
		Stderr: m.cfg.Stderr,
		SysProcAttr: &syscall.SysProcAttr{
			Setpgid:    true,
			Pdeathsig:  syscall.SIGTERM,
			Credential: m.cfg.Account.credential(),
		},
	}
	cmd.ExtraFiles = append(files, wf)

	w := &Worker{
		ID:     id,
		Slot:   slot,
		gen:    g,
		m:      m,
		cmd:    cmd,
		conn:   conn,
		done:   make(chan struct{}),
		keys:   make(map[handoff.Key]struct{}),
		logged: make(map[string]bool),
	}
	w.notify = notify
	w.spawnedAt = time.Now()
	err = m.spawner.start(cmd)
	for _, f := range cmd.ExtraFiles {
		f.Close()
	}
	if err != nil {
		conn.Close()
		notify.close()
		return nil, fmt.Errorf("start %s: %w", m.cfg.Program, err)
	}
	w.pid = cmd.Process.Pid
	w.log = m.log.With("generation", g.Num, "slot", slot, "pid", w.pid, "worker_id", id)
	w.log.Info("worker online")
	go w.serve()
	go w.readNotify()
	go w.wait()
	if d := m.cfg.ReadyTimer; d > 0 {
		time.AfterFunc(d, func() { m.workerReady(w, "timer") })
	}
	return w, nil
}

// wait reaps the worker and tells its generation.
func (w *Worker) wait() {
	err := w.cmd.Wait()
	desc, code := describeExit(w.cmd.ProcessState, err)
	// Close the master's end now: a listener fd still unread in the
	// channel buffer stays referenced until then (PITFALLS #27).
	w.conn.Close()
	w.notify.close()
	w.m.workerExited(w, desc, code)
	// Sockets only this worker's predecessors held are closed now, not at
	// the next drain: a worker that crash-loops asking for new addresses
	// must not make the master hold ever more.
	w.m.collect()
}

func describeExit(ps *os.ProcessState, err error) (string, int) {
	if ps == nil {
		return fmt.Sprintf("wait: %v", err), -1
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return "killed by signal " + unix.SignalName(ws.Signal()), 128 + int(ws.Signal())
	}
	return "exit status " + strconv.Itoa(ps.ExitCode()), ps.ExitCode()
}

// signal sends sig to the worker's process group (it leads its own), and to
// the worker itself if the group is gone (the worker called setsid).
// Called with m.mu held; a no-op once the worker is reaped.
func (w *Worker) signal(sig syscall.Signal) {
	if w.state == WorkerExited {
		return
	}
	// Probe the leader through os.Process first: it uses a pidfd, so it
	// cannot hit a recycled pid. Only if the worker still exists is its
	// group signalled: once, so that the leader gets the signal once.
	if err := w.cmd.Process.Signal(syscall.Signal(0)); err != nil {
		return
	}
	if err := syscall.Kill(-w.pid, sig); err != nil {
		// The worker left its process group (setsid): signal it alone.
		_ = w.cmd.Process.Signal(sig)
	}
}

// serve reads the worker's requests until the channel closes.
func (w *Worker) serve() {
	var lastSeq uint64
	helloSeen := false
	tokens, last := float64(floodBurst), time.Now()
	for {
		msg, fds, err := w.conn.Receive()
		if err != nil {
			if errors.Is(err, io.EOF) {
				w.log.Debug("worker closed its handoff channel")
				return
			}
			if errors.Is(err, net.ErrClosed) || w.isExited() {
				return
			}
			w.violation(err.Error())
			return
		}
		if len(fds) > 0 {
			for _, fd := range fds {
				unix.Close(fd)
			}
			w.violation(fmt.Sprintf("sent %d file descriptors", len(fds)))
			return
		}
		refill := func() {
			now := time.Now()
			tokens = min(tokens+now.Sub(last).Seconds()*floodRate, floodBurst)
			last = now
		}
		if refill(); tokens < 1 {
			w.warnOnce("flood", "worker sends requests faster than the master reads them; reading its channel more slowly", "rate_per_second", floodRate)
			time.Sleep(time.Duration((1 - tokens) / floodRate * float64(time.Second)))
			refill()
		}
		tokens--
		if !handoff.IsRequest(msg.Type) {
			w.violation(fmt.Sprintf("sent a %q message, which only the master sends", msg.Type))
			return
		}
		if msg.Seq <= lastSeq {
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
		case handoff.TypeListen:
			sendFD = w.listen(msg.Listen, reply)
		case handoff.TypeReady:
			w.m.workerReady(w, "handoff")
		}
		var serr error
		if sendFD >= 0 {
			serr = w.conn.Send(reply, sendFD)
			unix.Close(sendFD)
		} else {
			serr = w.conn.Send(reply)
		}
		if serr != nil {
			if errors.Is(serr, os.ErrDeadlineExceeded) {
				w.violation("stopped reading its handoff channel")
			} else if !w.isExited() && !errors.Is(serr, syscall.ECONNRESET) && !errors.Is(serr, syscall.EPIPE) {
				w.violation("its channel failed: " + serr.Error())
			}
			return
		}
	}
}

// listen answers one listen request, filling reply. It returns the fd to
// attach (owned by the caller), or -1 for none.
func (w *Worker) listen(req *handoff.ListenRequest, reply *handoff.Message) int {
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
	if mk, ok := w.m.reg.memberKey(k, w.Slot); ok {
		keys = append(keys, mk) // this slot's member of a reuseport group
	}
	w.m.mu.Lock()
	_, known := w.keys[k]
	if !known && len(w.keys) >= maxKeysPerWorker {
		w.m.mu.Unlock()
		reply.Error = fmt.Sprintf("listen %s: this worker already holds %d sockets, the most one worker may ask for", k, maxKeysPerWorker)
		reply.Errno = "EMFILE"
		w.warnOnce("keys", "listen refused: the worker holds too many sockets", "limit", maxKeysPerWorker)
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
			w.warnOnce("max-sockets", "listen refused: the master holds --max-sockets sockets", "key", k.String(), "error", err)
		} else {
			w.warnOnce("listen:"+reply.Errno, "listen failed", "key", k.String(), "error", err)
		}
		return -1
	}
	reply.Network, reply.Address = s.Network, s.Addr
	w.log.Debug("listener handed over", "key", s.Key.String(), "addr", s.Addr)
	return fd
}

// warnOnce logs a warning the first time what happens to this worker, and
// never again: a worker repeating a refused request must not flood the
// master's log (the worker itself gets every error).
func (w *Worker) warnOnce(what, msg string, args ...any) {
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
func (w *Worker) violation(reason string) {
	w.m.mu.Lock()
	if w.violated || w.state == WorkerExited {
		w.m.mu.Unlock()
		return
	}
	w.violated = true
	w.signal(w.m.cfg.StopSignal)
	w.m.mu.Unlock()
	w.log.Error("worker broke the handoff protocol; stopping it", "reason", reason)
	w.conn.Close()
	go func() {
		select {
		case <-w.done:
		case <-time.After(w.m.cfg.DrainTimeout):
			w.m.mu.Lock()
			w.signal(syscall.SIGKILL)
			w.m.mu.Unlock()
		}
	}()
}

func (w *Worker) isExited() bool {
	w.m.mu.Lock()
	defer w.m.mu.Unlock()
	return w.state == WorkerExited
}
