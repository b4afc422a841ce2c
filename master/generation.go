package master

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/gorolling/gorolling/handoff"
	"github.com/gorolling/gorolling/master/events"
	"github.com/gorolling/gorolling/master/placement"
)

// genState is where a generation is in its life.
type genState int

// Generation states.
const (
	// genStarting: spawned by an upgrade, not yet serving. A worker that
	// exits now fails the generation; nothing is respawned.
	genStarting genState = iota
	// genServing: the current generation. Crashed workers are respawned.
	genServing
	// genDraining: told to finish and exit.
	genDraining
	// genStopped: every worker has exited.
	genStopped
)

// String names the state as status shows it.
func (s genState) String() string {
	switch s {
	case genStarting:
		return "starting"
	case genServing:
		return "serving"
	case genDraining:
		return "draining"
	case genStopped:
		return "stopped"
	}
	return "unknown"
}

// errStopped is returned by waits on a generation that was drained.
var errStopped = errors.New("master: generation stopped")

// Generation is one set of N workers started from one program file. Its
// mutable fields are guarded by the master's mutex.
type Generation struct {
	// Num is the generation number: 1, 2, ...
	Num int
	// path is the absolute program path this generation runs, and dir
	// its workers' working directory, both with symlinks resolved when it
	// started.
	path, dir string
	// Started is when the generation was created.
	Started time.Time

	m       *Master
	state   genState
	slots   []*slot
	live    int                 // forking or spawned, and not yet reaped
	running map[*child]struct{} // spawned and not yet reaped, in a slot or not
	failure error               // first worker exit while starting
	drained chan struct{}
}

// slot is one position of a generation. Its worker is replaced when it
// crashes (serving generations only); the slot number is the worker's
// GOROLLING_SLOT, reused by the next generation.
type slot struct {
	index     int
	w         *child                   // the current worker, or the last one while a respawn waits
	pinned    map[handoff.Key]struct{} // the last worker's keys, held until w is ready
	backoff   backoff
	timer     timer
	restarts  int
	everReady bool
	failedAt  time.Time // its first worker exited before it was ever ready
	lastExit  string
}

// StartGeneration spawns a new generation of workers from the program at
// path (as many as the master's current size). With serving true it
// becomes the serving generation at once (the first generation: crashes
// are respawned); otherwise it is starting until Promote. If a worker
// cannot be spawned it returns the generation (so the caller can drain the
// workers that did start) and the error.
func (m *Master) StartGeneration(path string, serving bool) (*Generation, error) {
	// The generation keeps the release it started with: the program path
	// and --chdir are resolved through their symlinks now, so that a
	// respawn in this generation (a crash, a scale-up, the old generation
	// after a rollback) runs this release even once a deploy switched a
	// "current" symlink to another. A file replaced in place cannot be
	// pinned this way.
	dir := m.cfg.dir
	if m.cfg.Dir != "" {
		if r, err := filepath.EvalSymlinks(m.cfg.Dir); err == nil {
			dir = r
		}
	}
	if r, err := filepath.EvalSymlinks(path); err == nil {
		path = r
	}
	m.mu.Lock()
	if m.stopping {
		m.mu.Unlock()
		return nil, errors.New("master is stopping")
	}
	m.lastGen++
	g := &Generation{
		Num:     m.lastGen,
		path:    path,
		dir:     dir,
		Started: m.cfg.clock.now(),
		m:       m,
		state:   genStarting,
		running: make(map[*child]struct{}),
		drained: make(chan struct{}),
	}
	for i := 0; i < m.workers; i++ {
		g.slots = append(g.slots, &slot{index: i})
	}
	if serving {
		g.state = genServing
		m.serving = g
	}
	m.gens = append(m.gens, g)
	slots := append([]*slot(nil), g.slots...)
	m.mu.Unlock()
	m.log.Info("generation starting", events.Key, events.GenerationStarting, "generation", g.Num, "program", path, "workers", len(slots))
	for _, s := range slots {
		if err := m.startSlot(g, s); err != nil {
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
	if g.state >= genDraining || m.stopping {
		m.mu.Unlock()
		return nil
	}
	g.live++ // counted before the fork, so that a drain waits for it
	m.mu.Unlock()
	if _, err := m.spawn(g, s); err != nil {
		m.mu.Lock()
		g.live--
		m.notifyLocked()
		m.mu.Unlock()
		return err
	}
	return nil
}

// workerReady marks w ready.
func (m *Master) workerReady(w *child, via string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if w.state != workerStarting {
		return
	}
	w.state = workerReadyState
	w.readyAt = m.cfg.clock.now()
	for _, s := range w.gen.slots {
		if s.w == w {
			s.everReady = true
			s.pinned = nil
		}
	}
	w.log.Info("worker ready", events.Key, events.WorkerReady, "duration", w.readyAt.Sub(w.spawnedAt), "via", via)
	m.notifyLocked()
}

// workerExited records a reaped worker and applies its generation's
// policy: nothing while draining, a failed start while starting, a respawn
// with backoff while serving.
func (m *Master) workerExited(w *child, desc string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	prev := w.state
	w.state = workerExitedState
	close(w.done)
	g := w.gen
	g.live--
	delete(g.running, w)
	var s *slot
	for _, sl := range g.slots {
		if sl.w == w {
			s = sl
		}
	}
	if s != nil {
		s.pinned = nil // the exited worker itself now holds what its slot needs
	}
	uptime := m.cfg.clock.now().Sub(w.spawnedAt)
	switch {
	case prev == workerDraining || g.state >= genDraining || m.stopping || s == nil:
		w.log.Info("worker exited", events.Key, events.WorkerExited, "status", desc, "uptime", uptime.Round(time.Millisecond))
	case g.state == genStarting:
		w.log.Error("worker exited before its generation took over", events.Key, events.WorkerExited, "status", desc)
		if g.failure == nil {
			g.failure = fmt.Errorf("worker slot %d (pid %d) %s before the generation was ready", w.Slot, w.pid, desc)
		}
	default:
		if prev == workerStarting && !s.everReady && s.failedAt.IsZero() {
			s.failedAt = m.cfg.clock.now()
		}
		s.lastExit = desc
		d := s.backoff.next(uptime)
		w.log.Warn("worker exited unexpectedly; respawning", events.Key, events.WorkerRespawning, "status", desc, "uptime", uptime.Round(time.Millisecond), "backoff", d)
		m.scheduleRespawnLocked(g, s, d)
	}
	m.notifyLocked()
}

// scheduleRespawnLocked starts s's next worker after d.
func (m *Master) scheduleRespawnLocked(g *Generation, s *slot, d time.Duration) {
	s.timer = m.cfg.clock.afterFunc(d, func() { m.respawn(g, s) })
}

func (m *Master) respawn(g *Generation, s *slot) {
	m.mu.Lock()
	if g.state != genServing || m.stopping || !g.hasSlotLocked(s) {
		m.mu.Unlock()
		return
	}
	s.timer = nil
	s.restarts++
	m.mu.Unlock()
	if err := m.startSlot(g, s); err != nil {
		m.mu.Lock()
		defer m.mu.Unlock()
		d := s.backoff.next(0)
		m.log.Error("respawn failed; trying again", "generation", g.Num, "slot", s.index, "error", err, "backoff", d)
		if g.state == genServing && !m.stopping {
			m.scheduleRespawnLocked(g, s, d)
		}
	}
}

func (g *Generation) hasSlotLocked(s *slot) bool {
	for _, x := range g.slots {
		if x == s {
			return true
		}
	}
	return false
}

// WaitReady blocks until every slot of g has a ready worker (nil), a worker
// of a starting generation exits (that failure), g is drained (ErrStopped),
// or ctx ends (an error wrapping ctx's, with how many were ready).
func (g *Generation) WaitReady(ctx context.Context) error {
	return g.m.waitFor(ctx.Done(), func() (bool, error) {
		if g.failure != nil {
			return true, g.failure
		}
		if g.state >= genDraining {
			return true, errStopped
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
	return g.m.waitFor(ctx.Done(), func() (bool, error) {
		if g.failure != nil {
			return true, g.failure
		}
		if g.state >= genDraining {
			return true, errStopped
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
		if s.w != nil && s.w.state == workerReadyState {
			n++
		}
	}
	return n
}

// ReadyTiming reports, for a generation whose workers are all ready, the
// longest time one worker took from fork to ready.
func (g *Generation) ReadyTiming() time.Duration {
	g.m.mu.Lock()
	defer g.m.mu.Unlock()
	var slowest time.Duration
	for _, s := range g.slots {
		if s.w != nil && !s.w.readyAt.IsZero() {
			slowest = max(slowest, s.w.readyAt.Sub(s.w.spawnedAt))
		}
	}
	return slowest
}

// Drain stops g: every worker gets a "drain" message and the stop signal,
// then has the drain timeout to exit before it is SIGKILLed. Drain blocks
// until every worker of g has been reaped, then closes the sockets no live
// worker holds. It is idempotent and may be called concurrently.
func (g *Generation) Drain() {
	m := g.m
	m.mu.Lock()
	if g.state < genDraining {
		if m.serving == g {
			m.serving = nil
		}
		g.state = genDraining
		for _, s := range g.slots {
			if s.timer != nil {
				s.timer.Stop()
				s.timer = nil
			}
		}
		for w := range g.running {
			m.drainLocked(w)
		}
		m.log.Info("generation draining", events.Key, events.GenerationDraining, "generation", g.Num, "workers", g.live, "timeout", m.cfg.DrainTimeout)
		m.notifyLocked()
	}
	m.mu.Unlock()
	_ = m.waitFor(nil, func() (bool, error) { return g.live == 0, nil }, nil)
	m.mu.Lock()
	if g.state != genStopped {
		g.state = genStopped
		for i, x := range m.gens {
			if x == g {
				m.gens = append(m.gens[:i], m.gens[i+1:]...)
				break
			}
		}
		close(g.drained)
		m.log.Info("generation stopped", events.Key, events.GenerationStopped, "generation", g.Num, "duration", m.cfg.clock.now().Sub(g.Started).Round(time.Millisecond))
		m.notifyLocked()
	}
	m.mu.Unlock()
	<-g.drained
	m.collect()
}

// collect closes registry sockets that no live worker holds. It holds the
// master's lock throughout, so that a listen (which records its key under
// the same lock before it acquires the socket) cannot lose its socket to a
// collection that decided before it.
func (m *Master) collect() {
	m.mu.Lock()
	defer m.mu.Unlock()
	// Stop leaves the sockets to the registry's owner. With no generation
	// serving (a first generation that failed, a successor master not yet
	// in charge) there is nobody to collect for, and a successor shares
	// every socket with the master that still serves.
	if m.stopping || m.serving == nil {
		return
	}
	inUse := make(map[handoff.Key]bool)
	for _, g := range m.gens {
		// The last worker of each slot counts even if it has exited, and
		// its keys stay pinned until its replacement is ready: a slot
		// waiting for its respawn will ask for the same sockets.
		for _, s := range g.slots {
			if s.w != nil {
				for k := range s.w.keys {
					inUse[k] = true
				}
			}
			for k := range s.pinned {
				inUse[k] = true
			}
		}
	}
	gone := m.reg.Collect(func(k handoff.Key) bool { return inUse[k] })
	for _, s := range gone {
		m.log.Info("listener closed: no live worker holds it", events.Key, events.ListenerClosed, "key", s.Key.String(), "addr", s.Addr)
	}
	if len(gone) > 0 {
		m.placeLocked()
	}
}

// MaxWorkers bounds the number of workers per generation (Config.Workers,
// Scale): a slot is a member index of each reuseport group that even
// spreading steers.
const MaxWorkers = placement.MaxMembers

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
	if n < 1 || n > MaxWorkers {
		return fmt.Errorf("scale to %d: want 1 to %d workers", n, MaxWorkers)
	}
	m.mu.Lock()
	if m.stopping {
		m.mu.Unlock()
		return errors.New("scale: the master is stopping")
	}
	for _, g := range m.gens {
		if g.state == genStarting {
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
			if s.w != nil {
				m.drainLocked(s.w)
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
			m.mu.Lock()
			d := s.backoff.next(0)
			m.log.Error("spawn for scale-up failed; trying again", "slot", s.index, "error", err, "backoff", d)
			m.scheduleRespawnLocked(g, s, d)
			m.mu.Unlock()
		}
	}
	return nil
}
