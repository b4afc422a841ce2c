// Package upgrade owns generation rollover: it starts the first generation,
// and on each request starts generation G+1 from the program as it is on
// disk now, waits until every new worker is ready, then drains generation
// G. A new worker that exits or misses the ready timeout rolls the upgrade
// back: G+1 is drained and G keeps serving. Requests that arrive while an
// upgrade runs are coalesced into one more upgrade after it.
//
// The package decides policy only; it never touches sockets or processes
// directly, which the master package owns.
package upgrade

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/gorolling/gorolling/master"
	"github.com/hashicorp/go-hclog"
)

// Config configures a Manager.
type Config struct {
	// ReadyTimeout bounds how long a new generation may take to be ready.
	ReadyTimeout time.Duration
	// DrainTimeout is how long a retired generation gets to exit.
	DrainTimeout time.Duration
	// ReadyHint, if set, is appended to a ready-timeout error (for example
	// a suggestion of --ready=timer:DURATION).
	ReadyHint string
	// Logger receives upgrade events; nil means none.
	Logger hclog.Logger
}

// Result reports one finished upgrade.
type Result struct {
	// From is the generation that served before; To the one started.
	From, To int
	// Err is nil if To took over, else why the upgrade rolled back.
	Err error
	// Requested is when the (first coalesced) request arrived.
	Requested time.Time
	// Ready is how long from the request until every new worker was ready.
	Ready time.Duration
	// WorkerStart is the slowest new worker's own time from fork to ready.
	WorkerStart time.Duration
	// Finished is how long from the request until the old generation was
	// gone (or, on rollback, until the new one was stopped).
	Finished time.Duration
}

// ErrStopping is the result of an upgrade requested or interrupted while
// the master stops.
var ErrStopping = errors.New("upgrade: the master is stopping")

// Manager runs upgrades one at a time. Its methods are safe for concurrent
// use.
type Manager struct {
	m   *master.Master
	cfg Config
	log hclog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu             sync.Mutex
	running        bool
	pending        bool
	pendingAt      time.Time
	pendingWaiters []chan Result
	last           *Result
}

// New returns a manager for m.
func New(m *master.Master, cfg Config) *Manager {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Manager{m: m, cfg: cfg, log: cfg.Logger, ctx: ctx, cancel: cancel}
}

// Start starts the first generation and waits for it. It succeeds once
// every worker is ready, or once the ready timeout passes with at least one
// ready (the rest keep being respawned). It fails, after stopping whatever
// it started, if the program cannot be resolved or started, if every
// worker exits before any is ready, or if none is ready in time.
func (u *Manager) Start() (*master.Generation, error) {
	path, err := u.m.Resolve()
	if err != nil {
		return nil, err
	}
	g, err := u.m.StartGeneration(path, true)
	if err != nil {
		if g != nil {
			g.Drain(u.cfg.DrainTimeout)
		}
		return nil, err
	}
	ctx, cancel := context.WithTimeout(u.ctx, u.cfg.ReadyTimeout)
	defer cancel()
	if err := g.WaitFirst(ctx); err != nil {
		if errors.Is(err, context.DeadlineExceeded) && u.cfg.ReadyHint != "" {
			err = fmt.Errorf("%w (%s)", err, u.cfg.ReadyHint)
		}
		g.Drain(u.cfg.DrainTimeout)
		return nil, err
	}
	ready := 0
	for _, w := range g.Workers() {
		if w != nil {
			ready++
		}
	}
	slowest, _ := g.ReadyTiming()
	u.log.Info("generation serving", "generation", g.Num, "duration", time.Since(g.Started).Round(time.Microsecond), "worker_start", slowest.Round(time.Microsecond))
	return g, nil
}

// Trigger requests an upgrade and returns a channel that receives its
// result. If none runs, one starts now. If one runs, the request joins the
// single upgrade queued after it (its program may have been resolved before
// the new binary was in place), however many requests arrive meanwhile.
func (u *Manager) Trigger() <-chan Result {
	now := time.Now()
	ch := make(chan Result, 1)
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.ctx.Err() != nil || u.m.Stopping() {
		ch <- Result{Err: ErrStopping, Requested: now}
		return ch
	}
	if u.running {
		if u.pending {
			u.log.Info("upgrade request coalesced with the queued one")
		} else {
			u.pending, u.pendingAt = true, now
			u.log.Info("upgrade queued: another is in progress")
		}
		u.pendingWaiters = append(u.pendingWaiters, ch)
		return ch
	}
	u.running = true
	u.wg.Add(1)
	go u.loop(now, []chan Result{ch})
	return ch
}

// Running reports whether an upgrade is in progress.
func (u *Manager) Running() bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.running
}

// Last returns the result of the last finished upgrade, or nil.
func (u *Manager) Last() *Result {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.last
}

// Stop interrupts a running start or upgrade (its new generation is
// stopped) and refuses later ones. It does not block; Wait does.
func (u *Manager) Stop() {
	u.cancel()
}

// Wait blocks until no upgrade runs.
func (u *Manager) Wait() {
	u.wg.Wait()
}

func (u *Manager) loop(at time.Time, waiters []chan Result) {
	defer u.wg.Done()
	for {
		res := u.run(at)
		u.mu.Lock()
		u.last = &res
		for _, w := range waiters {
			w <- res
		}
		if !u.pending {
			u.running = false
			u.mu.Unlock()
			return
		}
		at, waiters = u.pendingAt, u.pendingWaiters
		u.pending, u.pendingWaiters = false, nil
		if u.ctx.Err() != nil {
			u.running = false
			u.mu.Unlock()
			for _, w := range waiters {
				w <- Result{Err: ErrStopping, Requested: at}
			}
			return
		}
		u.mu.Unlock()
	}
}

// run performs one upgrade.
func (u *Manager) run(at time.Time) Result {
	res := Result{Requested: at}
	if cur := u.m.Serving(); cur != nil {
		res.From = cur.Num
	}
	u.log.Info("upgrade started", "from", res.From)
	fail := func(g *master.Generation, err error) Result {
		res.Err = err
		if g != nil {
			res.To = g.Num
			u.log.Error("upgrade failed; rolling back", "generation", g.Num, "serving", res.From, "reason", err.Error())
			g.Drain(u.cfg.DrainTimeout)
		} else {
			u.log.Error("upgrade failed; rolling back", "serving", res.From, "reason", err.Error())
		}
		res.Finished = time.Since(at)
		u.log.Error("upgrade rolled back", "generation", res.To, "serving", res.From, "reason", err.Error(), "duration", res.Finished.Round(time.Millisecond))
		return res
	}
	if u.ctx.Err() != nil {
		return fail(nil, ErrStopping)
	}
	path, err := u.m.Resolve()
	if err != nil {
		return fail(nil, err)
	}
	g, err := u.m.StartGeneration(path, false)
	if err != nil {
		return fail(g, err)
	}
	res.To = g.Num
	ctx, cancel := context.WithTimeout(u.ctx, u.cfg.ReadyTimeout)
	err = g.WaitReady(ctx)
	cancel()
	if err != nil {
		switch {
		case u.ctx.Err() != nil:
			err = ErrStopping
		case errors.Is(err, context.DeadlineExceeded):
			err = fmt.Errorf("new generation not ready within %s: %w", u.cfg.ReadyTimeout, err)
			if u.cfg.ReadyHint != "" {
				err = fmt.Errorf("%w (%s)", err, u.cfg.ReadyHint)
			}
		}
		return fail(g, err)
	}
	res.Ready = time.Since(at)
	res.WorkerStart, _ = g.ReadyTiming()
	old, err := u.m.Promote(g)
	if err != nil {
		return fail(g, err)
	}
	u.log.Info("upgrade ready", "generation", g.Num, "from", res.From,
		"duration", res.Ready.Round(time.Microsecond),
		"worker_start", res.WorkerStart.Round(time.Microsecond),
		"overhead", (res.Ready - res.WorkerStart).Round(time.Microsecond))
	if old != nil {
		old.Drain(u.cfg.DrainTimeout)
	}
	res.Finished = time.Since(at)
	u.log.Info("upgrade finished", "generation", g.Num, "from", res.From,
		"duration", res.Finished.Round(time.Millisecond),
		"drain", (res.Finished - res.Ready).Round(time.Millisecond))
	return res
}
