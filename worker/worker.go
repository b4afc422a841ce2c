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

	"github.com/gorolling/gorolling/handoff"
)

// DefaultDrainTimeout is the drain deadline when draining starts without
// one from the master: on SIGTERM or SIGINT when running standalone, or when
// the master has gone away.
const DefaultDrainTimeout = 30 * time.Second

// Environment variables a gorolling master sets for its workers.
const (
	EnvFD         = "GOROLLING_FD"
	EnvSlot       = "GOROLLING_SLOT"
	EnvWorkerID   = "GOROLLING_WORKER_ID"
	EnvGeneration = "GOROLLING_GENERATION"
)

var (
	slot, workerID, generation = -1, 0, 0
	channelFD                  = -1
)

func init() {
	// Mark the inherited channel close-on-exec at once, so children this
	// program starts before it first calls the package do not inherit it.
	if n, err := strconv.Atoi(os.Getenv(EnvFD)); err == nil && n > 2 {
		channelFD = n
		syscall.CloseOnExec(n)
	}
	if n, err := strconv.Atoi(os.Getenv(EnvSlot)); err == nil {
		slot = n
	}
	workerID, _ = strconv.Atoi(os.Getenv(EnvWorkerID))
	generation, _ = strconv.Atoi(os.Getenv(EnvGeneration))
}

// IsWorker reports whether this process was started by a gorolling master.
func IsWorker() bool { return channelFD >= 0 }

// Slot returns this worker's slot, 0..N-1. A crashed worker's replacement
// and the next generation's worker in the same position get the same slot.
// It returns -1 outside gorolling.
func Slot() int { return slot }

// ID returns this worker's id: unique for the master's life, increasing,
// never reused (like Node's worker.id). It returns 0 outside gorolling.
func ID() int { return workerID }

// Generation returns this worker's generation: 1 for the workers the
// master started first, one more at each upgrade. It returns 0 outside
// gorolling.
func Generation() int { return generation }

// client is the worker's side of the handoff channel.
type client struct {
	conn *handoff.Conn

	mu      sync.Mutex
	seq     uint64
	pending map[uint64]chan response
	broken  error
	held    map[handoff.Key][]syscall.Conn // per index key, by index

	readyOnce sync.Once
	readyErr  error
}

type response struct {
	msg *handoff.Message
	fds []int
}

var (
	standaloneReady    sync.Once
	standaloneReadyErr error
)

var (
	clientOnce sync.Once
	theClient  *client
	clientErr  error
)

// errBroken reports a request on a channel the master closed.
var errBroken = errors.New("gorolling: the master is gone")

// getClient connects to the master on first use. It returns nil, nil
// outside gorolling.
func getClient() (*client, error) {
	clientOnce.Do(func() {
		if channelFD < 0 {
			return
		}
		conn, err := handoff.FromFD(channelFD)
		os.Unsetenv(EnvFD) // the fd is ours now; children must not use it
		if err != nil {
			clientErr = fmt.Errorf("gorolling: handoff channel on fd %d: %w", channelFD, err)
			return
		}
		c := &client{
			conn:    conn,
			pending: make(map[uint64]chan response),
			held:    make(map[handoff.Key][]syscall.Conn),
		}
		go c.readLoop()
		theClient = c
		if _, err := c.request(context.Background(), &handoff.Message{Type: handoff.TypeHello, PID: os.Getpid()}); err != nil {
			clientErr = err
		}
	})
	return theClient, clientErr
}

func (c *client) readLoop() {
	for {
		msg, fds, err := c.conn.Receive()
		if err != nil {
			c.mu.Lock()
			c.broken = errBroken
			for seq, ch := range c.pending {
				close(ch)
				delete(c.pending, seq)
			}
			c.mu.Unlock()
			// The master died or closed the channel: drain and exit.
			startDrain(DefaultDrainTimeout)
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
			startDrain(time.Duration(msg.TimeoutMS) * time.Millisecond)
		}
		closeFDs(fds)
	}
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		syscall.Close(fd)
	}
}

// request sends m as the next request and waits for its reply.
func (c *client) request(ctx context.Context, m *handoff.Message) (response, error) {
	ch := make(chan response, 1)
	c.mu.Lock()
	if c.broken != nil {
		c.mu.Unlock()
		return response{}, c.broken
	}
	c.seq++
	m.V, m.Seq = handoff.Version, c.seq
	c.pending[m.Seq] = ch
	// Send under the lock so that sequence numbers reach the master in
	// order.
	err := c.conn.Send(m)
	if err != nil {
		delete(c.pending, m.Seq)
	}
	c.mu.Unlock()
	if err != nil {
		return response{}, err
	}
	select {
	case r, ok := <-ch:
		if !ok {
			return response{}, errBroken
		}
		return r, nil
	case <-ctx.Done():
		c.mu.Lock()
		delete(c.pending, m.Seq)
		c.mu.Unlock()
		// A reply that still arrives is closed by readLoop.
		return response{}, ctx.Err()
	}
}

// Ready tells the master this worker is ready to serve. Call it once every
// listener is open (the master counts a generation ready when all its
// workers are). It is idempotent: later calls return the first result.
// Outside gorolling it sends READY=1 to $NOTIFY_SOCKET when systemd set one
// (Type=notify services), and otherwise does nothing.
func Ready() error {
	c, err := getClient()
	if err != nil {
		return err
	}
	if c == nil {
		standaloneReady.Do(func() { standaloneReadyErr = sdNotify("READY=1") })
		return standaloneReadyErr
	}
	c.readyOnce.Do(func() {
		r, err := c.request(context.Background(), &handoff.Message{Type: handoff.TypeReady})
		if err == nil && r.msg.Error != "" {
			err = fmt.Errorf("gorolling: ready: %s", r.msg.Error)
		}
		closeFDs(r.fds)
		c.readyErr = err
	})
	return c.readyErr
}

// drain state, shared by gorolling and standalone runs.
var drain struct {
	once     sync.Once
	ch       chan struct{}
	mu       sync.Mutex
	deadline time.Time
	sigOnce  sync.Once
}

func init() { drain.ch = make(chan struct{}) }

func startDrain(timeout time.Duration) {
	drain.once.Do(func() {
		if timeout <= 0 {
			timeout = DefaultDrainTimeout
		}
		drain.mu.Lock()
		drain.deadline = time.Now().Add(timeout)
		drain.mu.Unlock()
		close(drain.ch)
		if !IsWorker() {
			_ = sdNotify("STOPPING=1") // under systemd directly
		}
	})
}

// Draining returns a channel that is closed when this worker should stop:
// the master sent "drain" (an upgrade retired this generation, or the
// master is stopping), the master went away, or the process got SIGTERM or
// SIGINT. From the first call on, those two signals start a drain instead
// of killing the process; a second one, a second or more after the first,
// restores their default action and re-raises it. Finish in-flight work by DrainDeadline and exit.
//
// Draining also connects to the master if that has not happened yet, so a
// worker that never listens through the package still learns of drains.
func Draining() <-chan struct{} {
	_, _ = getClient()
	drain.sigOnce.Do(func() {
		sigs := make(chan os.Signal, 2)
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
		go func() {
			<-sigs
			first := time.Now()
			startDrain(DefaultDrainTimeout)
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
			if p, err := os.FindProcess(os.Getpid()); err == nil {
				p.Signal(s)
			}
		}()
	})
	return drain.ch
}

// DrainDeadline returns when the worker must be gone, once Draining is
// closed; the zero time before that.
func DrainDeadline() time.Time {
	drain.mu.Lock()
	defer drain.mu.Unlock()
	return drain.deadline
}

// Context returns a context that is canceled when draining starts (see
// Draining).
func Context() context.Context {
	drainCtxOnce.Do(func() {
		ch := Draining()
		ctx, cancel := context.WithCancel(context.Background())
		drainCtx = ctx
		go func() {
			<-ch
			cancel()
		}()
	})
	return drainCtx
}

// One context for every caller: a goroutine per call would wait forever
// in a worker that never drains.
var (
	drainCtxOnce sync.Once
	drainCtx     context.Context
)
