package worker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/gorolling/gorolling/handoff"
)

// DefaultDrainTimeout is the drain deadline when draining starts without
// one from the master: on a signal (HandleSignals) when running
// standalone, or when the master has gone away.
const DefaultDrainTimeout = 30 * time.Second

// Environment variables a gorolling master sets for its workers.
const (
	EnvFD         = "GOROLLING_FD"
	EnvSlot       = "GOROLLING_SLOT"
	EnvWorkerID   = "GOROLLING_WORKER_ID"
	EnvGeneration = "GOROLLING_GENERATION"
)

// proc is this process as the package sees it: its identity, its channel
// to the master and its drain. std is the real one, set up from the
// environment on first use; the package's tests make their own.
type proc struct {
	getenv    func(string) string
	activate  bool // take LISTEN_FDS sockets (systemd's protocol) at setup
	setupOnce sync.Once
	slot      int
	id, gen   int
	chanFD    int // the handoff channel's descriptor, -1 outside gorolling

	actMu     sync.Mutex
	activated []*os.File // LISTEN_FDS sockets not taken yet

	connOnce sync.Once
	c        *client
	connErr  error

	readyOnce sync.Once
	readyErr  error

	drainOnce sync.Once
	drainCh   chan struct{}
	drainMu   sync.Mutex
	deadline  time.Time
	ctxOnce   sync.Once
	ctx       context.Context

	sigOnce sync.Once
}

var std = newProc(os.Getenv, true)

func newProc(getenv func(string) string, activate bool) *proc {
	return &proc{getenv: getenv, activate: activate, chanFD: -1, slot: -1, drainCh: make(chan struct{})}
}

// setup reads the environment once, on first use: importing the package
// does nothing. It marks the inherited descriptors close-on-exec, so that
// children this program starts do not inherit them (a child holding the
// handoff channel would hide the master's death from this worker); call
// any function of the package before starting children.
func (p *proc) setup() {
	p.setupOnce.Do(func() {
		if n, err := strconv.Atoi(p.getenv(EnvFD)); err == nil && n > 2 {
			p.chanFD = n
			syscall.CloseOnExec(n)
		}
		if n, err := strconv.Atoi(p.getenv(EnvSlot)); err == nil {
			p.slot = n
		}
		p.id, _ = strconv.Atoi(p.getenv(EnvWorkerID))
		p.gen, _ = strconv.Atoi(p.getenv(EnvGeneration))
		if p.activate {
			// Sockets of systemd's socket activation (or gorolling's
			// --listen): close-on-exec, and the LISTEN_* variables gone.
			p.activated = activation.Files(true)
		}
	})
}

// IsWorker reports whether this process was started by a gorolling master.
func IsWorker() bool { std.setup(); return std.chanFD >= 0 }

// Slot returns this worker's slot, 0..N-1. A crashed worker's replacement
// and the next generation's worker in the same position get the same slot.
// It returns -1 outside gorolling.
func Slot() int { std.setup(); return std.slot }

// ID returns this worker's id: unique for the service's life, increasing,
// never reused (like Node's worker.id). It returns 0 outside gorolling.
func ID() int { std.setup(); return std.id }

// Generation returns this worker's generation: 1 for the workers the
// master started first, one more at each upgrade. It returns 0 outside
// gorolling.
func Generation() int { std.setup(); return std.gen }

// client is the worker's side of the handoff channel.
type client struct {
	p    *proc
	conn *handoff.Conn

	sendMu  sync.Mutex // orders sends, so that sequence numbers arrive in order
	mu      sync.Mutex
	seq     uint64
	pending map[uint64]chan response
	broken  bool
	held    map[handoff.Key][]any // per index key, by index: open listeners

	conns    bool                      // the master relays connections (its hello reply said so)
	socks    []heldSock                // every socket the master gave, for finding a connection's key
	adopters map[string]*adoptListener // by key: where handed-over connections go
}

type response struct {
	msg *handoff.Message
	fds []int
}

// errMasterGone reports a request on a channel the master closed.
var errMasterGone = &ListenError{Errno: syscall.EPIPE, Msg: "the master is gone"}

// connect connects to the master on first use. It returns nil, nil
// outside gorolling.
func (p *proc) connect() (*client, error) {
	p.setup()
	p.connOnce.Do(func() {
		if p.chanFD < 0 {
			return
		}
		conn, err := handoff.FromFD(p.chanFD)
		if p == std {
			os.Unsetenv(EnvFD) // the descriptor is ours now; children must not use it
		}
		if err != nil {
			p.connErr = fmt.Errorf("gorolling: handoff channel on fd %d: %w", p.chanFD, err)
			return
		}
		c := &client{p: p, conn: conn, pending: make(map[uint64]chan response), held: make(map[handoff.Key][]any), adopters: make(map[string]*adoptListener)}
		go c.readLoop()
		p.c = c
		r, err := c.request(context.Background(), &handoff.Message{Type: handoff.TypeHello, PID: os.Getpid(), Conns: true})
		if err != nil {
			p.connErr = err
			return
		}
		closeFDs(r.fds)
		for _, f := range r.msg.Features {
			if f == handoff.FeatureConns {
				c.mu.Lock()
				c.conns = true
				c.mu.Unlock()
			}
		}
	})
	return p.c, p.connErr
}

func (c *client) readLoop() {
	for {
		msg, fds, err := c.conn.Receive()
		if err != nil {
			c.mu.Lock()
			c.broken = true
			for seq, ch := range c.pending {
				close(ch)
				delete(c.pending, seq)
			}
			c.mu.Unlock()
			// The master died or closed the channel: drain and exit.
			c.p.startDrain(DefaultDrainTimeout)
			return
		}
		switch msg.Type {
		case handoff.TypeReply:
			c.mu.Lock()
			ch := c.pending[msg.ReplyTo]
			delete(c.pending, msg.ReplyTo)
			c.mu.Unlock()
			if ch != nil {
				ch <- response{msg: msg, fds: fds}
				continue
			}
		case handoff.TypeDrain:
			c.p.startDrain(time.Duration(msg.TimeoutMS) * time.Millisecond)
		case handoff.TypeConn:
			if len(fds) == 1 {
				go c.deliver(msg, fds[0])
				continue
			}
		}
		closeFDs(fds)
	}
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		syscall.Close(fd)
	}
}

// errUnanswered is wrapped by request's error when the request was sent
// but no reply came: the master may have acted on it.
var errUnanswered = errors.New("sent, but the master did not answer")

// request sends m, with fds attached, as the next request and waits for
// its reply. The caller keeps its fds.
func (c *client) request(ctx context.Context, m *handoff.Message, fds ...int) (response, error) {
	ch := make(chan response, 1)
	// sendMu, not mu, is held while sending: a send that waits for the
	// master must not keep readLoop from delivering replies.
	c.sendMu.Lock()
	c.mu.Lock()
	if c.broken {
		c.mu.Unlock()
		c.sendMu.Unlock()
		return response{}, errMasterGone
	}
	c.seq++
	m.V, m.Seq = handoff.Version, c.seq
	c.pending[m.Seq] = ch
	c.mu.Unlock()
	err := c.conn.Send(m, fds...)
	c.sendMu.Unlock()
	if err != nil {
		c.mu.Lock()
		delete(c.pending, m.Seq)
		c.mu.Unlock()
		return response{}, err
	}
	select {
	case r, ok := <-ch:
		if !ok {
			return response{}, fmt.Errorf("%w: %w", errUnanswered, errMasterGone)
		}
		return r, nil
	case <-ctx.Done():
		c.mu.Lock()
		delete(c.pending, m.Seq)
		c.mu.Unlock()
		// A reply that still arrives is closed by readLoop.
		return response{}, fmt.Errorf("%w: %w", errUnanswered, ctx.Err())
	}
}

// Ready tells the master this worker is ready to serve. Call it once every
// listener is open (the master counts a generation ready when all its
// workers are). It is idempotent: later calls return the first result.
// Outside gorolling it sends READY=1 to $NOTIFY_SOCKET when systemd set one
// (Type=notify services), and otherwise does nothing.
func Ready() error { return std.ready() }

func (p *proc) ready() error {
	c, err := p.connect()
	if err != nil {
		return err
	}
	p.readyOnce.Do(func() {
		if c == nil {
			if p == std {
				_, p.readyErr = daemon.SdNotify(false, daemon.SdNotifyReady)
			}
			return
		}
		r, err := c.request(context.Background(), &handoff.Message{Type: handoff.TypeReady})
		if err == nil && r.msg.Error != "" {
			err = fmt.Errorf("gorolling: ready: %s", r.msg.Error)
		}
		closeFDs(r.fds)
		p.readyErr = err
	})
	return p.readyErr
}

func (p *proc) startDrain(timeout time.Duration) {
	p.drainOnce.Do(func() {
		if timeout <= 0 {
			timeout = DefaultDrainTimeout
		}
		p.drainMu.Lock()
		p.deadline = time.Now().Add(timeout)
		p.drainMu.Unlock()
		close(p.drainCh)
		if p == std && p.chanFD < 0 {
			_, _ = daemon.SdNotify(false, daemon.SdNotifyStopping) // under systemd directly
		}
	})
}

// Draining returns a channel that is closed when this worker should stop:
// the master sent "drain" (an upgrade retired this generation, or the
// master is stopping) or the master went away; and, once HandleSignals has
// been called, on SIGTERM or SIGINT. Finish in-flight work by DrainDeadline
// and exit.
//
// The master sends its stop signal (SIGTERM by default) right after the
// drain message. A program that does not handle that signal is killed by
// it before it has drained: call HandleSignals (ServeHTTP does), or handle
// SIGTERM yourself.
//
// Draining also connects to the master if that has not happened yet, so a
// worker that never listens through the package still learns of drains.
func Draining() <-chan struct{} { return std.draining() }

func (p *proc) draining() <-chan struct{} {
	_, _ = p.connect()
	return p.drainCh
}

// DrainDeadline returns when the worker must be gone, once Draining is
// closed; the zero time before that.
func DrainDeadline() time.Time { return std.drainDeadline() }

func (p *proc) drainDeadline() time.Time {
	p.setup()
	p.drainMu.Lock()
	defer p.drainMu.Unlock()
	return p.deadline
}

// Context returns a context that is canceled when draining starts (see
// Draining). Every call returns the same context.
func Context() context.Context { return std.context() }

func (p *proc) context() context.Context {
	p.ctxOnce.Do(func() {
		ch := p.draining()
		ctx, cancel := context.WithCancel(context.Background())
		p.ctx = ctx
		go func() {
			<-ch
			cancel()
		}()
	})
	return p.ctx
}

// HandleSignals makes SIGTERM and SIGINT start a drain (see Draining)
// instead of ending the program: the master sends SIGTERM right after its
// drain message, and a shell's Ctrl-C should drain a standalone run too. A
// second such signal, a second or more after the first, ends the program
// with the signal's default action. It is idempotent. Until that second
// signal, handlers the program installed itself receive the signals too
// (os/signal delivers to every channel); the second one resets them all
// and ends the program, so a program that must decide itself what a
// repeated signal does should not call HandleSignals and should handle
// SIGTERM itself; Draining still reports the master's drain message
// (ServeHTTP calls HandleSignals unless HTTPOptions.OwnSignals is set).
func HandleSignals() { std.handleSignals() }

func (p *proc) handleSignals() {
	p.setup()
	p.sigOnce.Do(func() {
		sigs := make(chan os.Signal, 2)
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
		go func() {
			<-sigs
			first := time.Now()
			p.startDrain(DefaultDrainTimeout)
			// A second signal means "stop now", unless it comes within a
			// second of the first: when a master dies, the kernel sends
			// the parent-death signal once per exiting master thread.
			var s os.Signal
			for s = range sigs {
				if time.Since(first) >= time.Second {
					break
				}
			}
			signal.Reset(syscall.SIGTERM, syscall.SIGINT)
			if pr, err := os.FindProcess(os.Getpid()); err == nil {
				pr.Signal(s)
			}
		}()
	})
}

// errNoListeners is returned by ServeHTTP without a listener.
var errNoListeners = errors.New("gorolling: ServeHTTP needs at least one listener")
