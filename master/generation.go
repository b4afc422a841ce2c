package master

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/handoff"
)

// GenState is where a generation is in its life.
type GenState int

// Generation states.
const (
	// GenStarting: spawned by an upgrade, not yet serving. A worker that
	// exits now fails the generation; nothing is respawned.
	GenStarting GenState = iota
	// GenServing: the current generation. Crashed workers are respawned.
	GenServing
	// GenDraining: told to finish and exit.
	GenDraining
	// GenStopped: every worker has exited.
	GenStopped
)

// String names the state as status shows it.
func (s GenState) String() string {
	switch s {
	case GenStarting:
		return "starting"
	case GenServing:
		return "serving"
	case GenDraining:
		return "draining"
	case GenStopped:
		return "stopped"
	}
	return "unknown"
}

// Respawn backoff (per slot): 100 ms doubling to 30 s, back to the start
// once a worker has lived a minute.
const (
	backoffMin     = 100 * time.Millisecond
	backoffMax     = 30 * time.Second
	healthyRuntime = time.Minute
)

// ErrStopped is returned by waits on a generation that was stopped.
var ErrStopped = errors.New("master: generation stopped")

// Generation is one set of N workers started from one program file. Its
// mutable fields are guarded by the master's mutex.
type Generation struct {
	// Num is the generation number: 1, 2, ...
	Num int
	// Path is the absolute program path this generation runs.
	Path string
	// Started is when the generation was created.
	Started time.Time

	m       *Master
	state   GenState
	slots   []*slot
	live    int   // spawned and not yet reaped
	failure error // first worker exit while starting
	drained chan struct{}
}

type slot struct {
	index     int
	w         *Worker
	delay     time.Duration
	timer     *time.Timer
	restarts  int
	everReady bool
	failedAt  time.Time // exited before it was ever ready
	lastExit  string
}

// State returns the generation's state.
func (g *Generation) State() GenState {
	g.m.mu.Lock()
	defer g.m.mu.Unlock()
	return g.state
}

// Workers returns the generation's current worker in each slot (nil for a
// slot waiting for a respawn).
func (g *Generation) Workers() []*Worker {
	g.m.mu.Lock()
	defer g.m.mu.Unlock()
	out := make([]*Worker, len(g.slots))
	for i, s := range g.slots {
		if s.w != nil && s.w.state != WorkerExited {
			out[i] = s.w
		}
	}
	return out
}

// StartGeneration spawns a new generation of n workers from the program at
// path. With serving true it becomes the serving generation at once (the
// first generation: crashes are respawned); otherwise it is starting until
// Promote. If a worker cannot be spawned it returns the generation (so the
// caller can stop the workers that did start) and the error.
func (m *Master) StartGeneration(path string, serving bool) (*Generation, error) {
	m.mu.Lock()
	if m.stopping {
		m.mu.Unlock()
		return nil, errors.New("master is stopping")
	}
	m.lastGen++
	g := &Generation{
		Num:     m.lastGen,
		Path:    path,
		Started: time.Now(),
		m:       m,
		state:   GenStarting,
		drained: make(chan struct{}),
	}
	n := m.workers
	for i := 0; i < n; i++ {
		g.slots = append(g.slots, &slot{index: i})
	}
	if serving {
		g.state = GenServing
		m.serving = g
	}
	m.gens = append(m.gens, g)
	m.mu.Unlock()
	m.log.Info("generation starting", "generation", g.Num, "program", path, "workers", n)

	for i := 0; i < n; i++ {
		if err := m.startSlot(g, g.slots[i]); err != nil {
			m.mu.Lock()
			if g.failure == nil {
				g.failure = err
			}
			m.notifyLocked()
			m.mu.Unlock()
			return g, err
		}
	}
	return g, nil
}

// startSlot spawns the slot's worker, unless the generation has moved on.
func (m *Master) startSlot(g *Generation, s *slot) error {
	m.mu.Lock()
	if g.state >= GenDraining || m.stopping {
		m.mu.Unlock()
		return nil
	}
	g.live++ // counted before the fork so a drain waits for it
	m.mu.Unlock()
	w, err := m.spawn(g, s.index)
	m.mu.Lock()
	defer m.mu.Unlock()
	if err != nil {
		g.live--
		m.notifyLocked()
		return err
	}
	s.w = w
	if g.state >= GenDraining {
		// A drain began while we forked: this worker drains at once.
		w.state = WorkerDraining
		go m.drainWorker(w)
	}
	m.notifyLocked()
	return nil
}

// workerReady marks w ready.
func (m *Master) workerReady(w *Worker, via string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if w.state != WorkerStarting {
		return
	}
	w.state = WorkerReady
	w.readyAt = time.Now()
	for _, s := range w.gen.slots {
		if s.w == w {
			s.everReady = true
		}
	}
	w.log.Info("worker ready", "duration", w.readyAt.Sub(w.spawnedAt), "via", via)
	m.notifyLocked()
}

// workerExited records a reaped worker and applies the generation's policy.
func (m *Master) workerExited(w *Worker, desc string, code int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	prev := w.state
	w.state = WorkerExited
	w.exitDesc, w.exitCode = desc, code
	close(w.done)
	g := w.gen
	g.live--
	var s *slot
	for _, sl := range g.slots {
		if sl.w == w {
			s = sl
		}
	}
	uptime := time.Since(w.spawnedAt)
	switch {
	case prev == WorkerDraining || g.state >= GenDraining || m.stopping:
		w.log.Info("worker exited", "status", desc, "uptime", uptime.Round(time.Millisecond))
	case g.state == GenStarting:
		w.log.Error("worker exited before its generation took over", "status", desc)
		if g.failure == nil {
			g.failure = fmt.Errorf("worker slot %d (pid %d) %s before the generation was ready", w.Slot, w.pid, desc)
		}
	default: // serving: respawn in the same slot with backoff
		if s != nil {
			if prev == WorkerStarting && !s.everReady && s.failedAt.IsZero() {
				s.failedAt = time.Now()
			}
			s.lastExit = desc
			if uptime >= healthyRuntime || s.delay == 0 {
				s.delay = backoffMin
			} else {
				s.delay = min(2*s.delay, backoffMax)
			}
			w.log.Warn("worker exited unexpectedly; respawning", "status", desc, "uptime", uptime.Round(time.Millisecond), "backoff", s.delay)
			sl := s
			s.timer = time.AfterFunc(s.delay, func() { m.respawn(g, sl) })
		}
	}
	m.notifyLocked()
}

func (m *Master) respawn(g *Generation, s *slot) {
	m.mu.Lock()
	if g.state != GenServing || m.stopping {
		m.mu.Unlock()
		return
	}
	s.timer = nil
	s.restarts++
	m.mu.Unlock()
	if err := m.startSlot(g, s); err != nil {
		m.log.Error("respawn failed", "generation", g.Num, "slot", s.index, "error", err)
		m.mu.Lock()
		if g.state == GenServing && !m.stopping {
			s.delay = min(2*max(s.delay, backoffMin), backoffMax)
			s.timer = time.AfterFunc(s.delay, func() { m.respawn(g, s) })
		}
		m.mu.Unlock()
		return
	}
	m.mu.Lock()
	if s.w != nil {
		s.w.log.Info("worker respawned", "restarts", s.restarts)
	}
	m.mu.Unlock()
}

// WaitReady blocks until every slot of g has a ready worker (nil), a worker
// of a starting generation exits (that failure), g is drained or stopped
// (ErrStopped), or ctx ends (ctx's error, with how many were ready).
func (g *Generation) WaitReady(ctx context.Context) error {
	return g.m.waitFor(ctx, func() (bool, error) {
		if g.failure != nil {
			return true, g.failure
		}
		if g.state >= GenDraining {
			return true, ErrStopped
		}
		return g.readyLocked() == len(g.slots), nil
	}, func() error {
		return fmt.Errorf("%d of %d workers ready: %w", g.readyLocked(), len(g.slots), ctx.Err())
	})
}

// WaitFirst is WaitReady for a first generation, whose crashed workers are
// respawned. It returns nil once every slot is ready, or once ctx ends with
// at least one worker ready; an error if ctx ends with none ready, or if
// every slot's first worker exited before any worker became ready.
func (g *Generation) WaitFirst(ctx context.Context) error {
	return g.m.waitFor(ctx, func() (bool, error) {
		if g.failure != nil {
			return true, g.failure
		}
		if g.state >= GenDraining {
			return true, ErrStopped
		}
		ready, failed := 0, 0
		var last string
		for _, s := range g.slots {
			if s.everReady {
				ready++
			}
			if !s.failedAt.IsZero() {
				failed++
				last = s.lastExit
			}
		}
		if ready == len(g.slots) {
			return true, nil
		}
		if ready == 0 && failed == len(g.slots) {
			return true, fmt.Errorf("every worker exited before it was ready (last: %s)", last)
		}
		return false, nil
	}, func() error {
		if g.readyLocked() > 0 {
			return nil
		}
		return fmt.Errorf("no worker became ready within the ready timeout: %w", ctx.Err())
	})
}

func (g *Generation) readyLocked() int {
	n := 0
	for _, s := range g.slots {
		if s.w != nil && s.w.state == WorkerReady {
			n++
		}
	}
	return n
}

// ReadyTiming reports, for a generation whose workers are all ready, the
// longest time one worker took from fork to ready, and when the last one
// became ready.
func (g *Generation) ReadyTiming() (slowest time.Duration, last time.Time) {
	g.m.mu.Lock()
	defer g.m.mu.Unlock()
	for _, s := range g.slots {
		if s.w == nil || s.w.readyAt.IsZero() {
			continue
		}
		if d := s.w.readyAt.Sub(s.w.spawnedAt); d > slowest {
			slowest = d
		}
		if s.w.readyAt.After(last) {
			last = s.w.readyAt
		}
	}
	return slowest, last
}

// Drain stops g: every worker gets a "drain" message and the stop signal,
// then has until timeout to exit; what is left is SIGKILLed. Drain blocks
// until every worker of g has been reaped, then closes the sockets no live
// worker holds. It may be called more than once and concurrently; a shorter
// timeout from a later call wins.
func (g *Generation) Drain(timeout time.Duration) {
	m := g.m
	m.mu.Lock()
	first := g.state < GenDraining
	if first {
		if m.serving == g {
			m.serving = nil
		}
		g.state = GenDraining
		for _, s := range g.slots {
			if s.timer != nil {
				s.timer.Stop()
				s.timer = nil
			}
			if s.w != nil && s.w.state != WorkerExited {
				if s.w.state != WorkerDraining {
					s.w.state = WorkerDraining
					go m.drainWorker(s.w)
				}
			}
		}
		m.log.Info("generation draining", "generation", g.Num, "workers", g.live, "timeout", timeout)
		m.notifyLocked()
	}
	m.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	err := m.waitFor(ctx, func() (bool, error) { return g.live == 0, nil }, nil)
	cancel()
	if err != nil {
		m.mu.Lock()
		n := 0
		for _, s := range g.slots {
			if s.w != nil && s.w.state != WorkerExited {
				s.w.log.Warn("worker still running after the drain timeout; killing it")
				s.w.signal(syscall.SIGKILL)
				n++
			}
		}
		m.mu.Unlock()
		_ = m.waitFor(context.Background(), func() (bool, error) { return g.live == 0, nil }, nil)
	}

	m.mu.Lock()
	if g.state != GenStopped {
		g.state = GenStopped
		for i, x := range m.gens {
			if x == g {
				m.gens = append(m.gens[:i], m.gens[i+1:]...)
				break
			}
		}
		close(g.drained)
		m.log.Info("generation stopped", "generation", g.Num, "duration", time.Since(g.Started).Round(time.Millisecond))
		m.notifyLocked()
	}
	m.mu.Unlock()
	<-g.drained
	m.collect()
}

// drainWorker tells one worker to drain: the drain message first, then the
// stop signal.
func (m *Master) drainWorker(w *Worker) {
	w.log.Info("worker draining")
	err := w.conn.Send(&handoff.Message{
		V: handoff.Version, Type: handoff.TypeDrain,
		TimeoutMS: m.cfg.DrainTimeout.Milliseconds(),
	})
	if err != nil {
		w.log.Debug("drain message not delivered", "error", err)
	}
	m.mu.Lock()
	w.signal(m.cfg.StopSignal)
	m.mu.Unlock()
}

// Kill SIGKILLs every worker of g now. Drain still does the reaping.
func (g *Generation) Kill() {
	g.m.mu.Lock()
	defer g.m.mu.Unlock()
	for _, s := range g.slots {
		if s.w != nil {
			s.w.signal(syscall.SIGKILL)
		}
	}
}

// collect closes registry sockets that no live worker holds. It holds the
// master's lock throughout, so that a listen (which records its key under
// the same lock before it acquires the socket) cannot lose its socket to a
// collection that decided before it.
func (m *Master) collect() {
	m.mu.Lock()
	defer m.mu.Unlock()
	inUse := make(map[handoff.Key]bool)
	for _, g := range m.gens {
		// The last worker of each slot counts even if it has exited: a
		// slot waiting for its respawn will ask for the same sockets.
		for _, s := range g.slots {
			if s.w != nil {
				for k := range s.w.keys {
					inUse[k] = true
				}
			}
		}
	}
	// Stop closes everything itself. With no generation serving (a first
	// generation that failed, a successor master not yet in charge) there
	// is nobody to collect for, and a successor shares every socket with
	// the master that still serves.
	if m.stopping || m.serving == nil || (m.successor && !m.tookOver) {
		return
	}
	for _, s := range m.reg.Collect(func(k handoff.Key) bool { return inUse[k] }) {
		m.log.Info("listener closed: no live worker holds it", "key", s.Key.String(), "addr", s.Addr)
	}
}

// maxWorkers bounds Scale.
const maxWorkers = 1024

// Size returns the number of workers per generation.
func (m *Master) Size() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.workers
}

// Scale sets the number of workers per generation to n. The serving
// generation gets new slots at once, or loses its highest slots (their
// workers drain, and are killed after the drain timeout). Later
// generations start with n. It fails while an upgrade starts a generation.
func (m *Master) Scale(n int) error {
	if n < 1 || n > maxWorkers {
		return fmt.Errorf("scale to %d: want 1 to %d workers", n, maxWorkers)
	}
	m.mu.Lock()
	if m.stopping {
		m.mu.Unlock()
		return errors.New("scale: the master is stopping")
	}
	for _, g := range m.gens {
		if g.state == GenStarting {
			m.mu.Unlock()
			return errors.New("scale: an upgrade is starting a generation; scale again when it is done")
		}
	}
	g := m.serving
	if g == nil {
		m.mu.Unlock()
		return errors.New("scale: no generation is serving")
	}
	from := len(g.slots)
	m.workers = n
	var add []*slot
	for i := from; i < n; i++ {
		s := &slot{index: i}
		g.slots = append(g.slots, s)
		add = append(add, s)
	}
	if n < from {
		for _, s := range g.slots[n:] {
			if s.timer != nil {
				s.timer.Stop()
				s.timer = nil
			}
			if w := s.w; w != nil && w.state != WorkerExited && w.state != WorkerDraining {
				w.state = WorkerDraining
				go m.drainWorker(w)
				go func() {
					select {
					case <-w.done:
					case <-time.After(m.cfg.DrainTimeout):
						m.mu.Lock()
						w.signal(syscall.SIGKILL)
						m.mu.Unlock()
					}
				}()
			}
		}
		g.slots = g.slots[:n]
	}
	m.notifyLocked()
	m.mu.Unlock()
	m.log.Info("scaled", "generation", g.Num, "from", from, "to", n)
	if n < from {
		// Removed slots' reuseport sockets: the master lets go of its copy
		// now, so the group stops hashing new connections to them once
		// their draining workers have closed theirs.
		m.collect()
	}
	for _, s := range add {
		if err := m.startSlot(g, s); err != nil {
			m.log.Error("spawn for scale-up failed; retrying with backoff", "slot", s.index, "error", err)
			m.mu.Lock()
			s.delay = backoffMin
			sl := s
			s.timer = time.AfterFunc(s.delay, func() { m.respawn(g, sl) })
			m.mu.Unlock()
		}
	}
	return nil
}
