// Package upgrade owns the rollover policy and the master's self-upgrade.
//
// Rollover (Manager): it starts the first generation, and on each request
// starts generation G+1 from the program as it is on disk now, waits until
// every new worker is ready, then drains generation G. A new worker that
// exits or misses the ready timeout rolls the upgrade back: G+1 is drained
// and G keeps serving. Requests that arrive while an upgrade runs are
// coalesced into one more upgrade after it; a queued master upgrade absorbs
// worker upgrades, since a new master starts a new generation too.
//
// Self-upgrade (Self): the master re-execs itself with cloudflare/tableflip
// and streams its sockets and state to the new master, which starts its own
// generation; once that is ready the old master drains its workers and
// exits. A new master that fails leaves the old one serving. An automatic
// upgrade (HUP) whose master re-exec fails rolls the workers instead.
//
// The package decides policy only: it never binds or accepts on a
// listening socket and never spawns a worker (the registry and the master
// do). Its self-upgrade makes the socketpairs that carry the state, and
// tableflip forks the new master.
package upgrade

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorolling/gorolling/master"
	"github.com/gorolling/gorolling/master/control"
	"github.com/gorolling/gorolling/master/events"
	"github.com/hashicorp/go-hclog"
)

// Kind says what an upgrade replaces.
type Kind int

// Upgrade kinds, in the order in which a queued request absorbs another.
const (
	// Workers starts a new generation of workers.
	Workers Kind = iota
	// Auto replaces the master when its binary changed on disk since it
	// started (and a master upgrade from that binary has not failed), else
	// only the workers (SIGHUP).
	Auto
	// Master re-execs the master from the binary on disk (SIGUSR2).
	Master
)

// String returns "workers", "auto" or "master".
func (k Kind) String() string {
	switch k {
	case Workers:
		return "workers"
	case Master:
		return "master"
	}
	return "auto"
}

// ParseKind parses "auto", "workers" or "master" ("" is auto).
func ParseKind(s string) (Kind, error) {
	switch s {
	case "", "auto":
		return Auto, nil
	case "workers":
		return Workers, nil
	case "master":
		return Master, nil
	}
	return 0, fmt.Errorf("unknown upgrade kind %q (want auto, workers or master)", s)
}

// Result reports one finished upgrade; Outcome is how it is reported.
type Result struct {
	// kind is what was upgraded: Workers or Master (an Auto request
	// becomes one of them).
	kind Kind
	// newMaster is the new master's pid after a master upgrade.
	newMaster int
	// from is the generation that served before; to the one started.
	from, to int
	// err is nil if to took over, else why the upgrade rolled back.
	err error
	// masterErr, for an automatic upgrade that fell back to the workers,
	// is why the master upgrade it tried first failed.
	masterErr error
	// requested is when the (first coalesced) request arrived.
	requested time.Time
	// ready is how long from the request until every new worker was ready.
	ready time.Duration
	// workerStart is the slowest new worker's own time from fork to ready.
	workerStart time.Duration
	// finished is how long from the request until the old generation was
	// gone (or, on rollback, until the new one was stopped).
	finished time.Duration
}

// forKind is the result as told to a caller that asked for kind. A caller that
// asked for a master upgrade is told it failed even when the request it
// was merged with then rolled the workers.
func (r Result) forKind(kind Kind) Result {
	if kind == Master && r.kind != Master && r.masterErr != nil {
		return Result{kind: Master, from: r.from, err: r.masterErr, requested: r.requested, finished: r.finished}
	}
	return r
}

// Outcome is the result as the control socket reports it.
func (r Result) Outcome() control.UpgradeOutcome {
	o := control.UpgradeOutcome{Kind: r.kind.String(), From: r.from, To: r.to, OK: r.err == nil,
		DurationMS: r.finished.Milliseconds(), NewPID: r.newMaster}
	if r.err != nil {
		o.Error = r.err.Error()
	}
	if r.masterErr != nil {
		o.MasterError = r.masterErr.Error()
	}
	return o
}

// Errors of a Manager.
var (
	// errStopping is the result of an upgrade requested or interrupted
	// while the master stops.
	errStopping = errors.New("upgrade: the master is stopping")
	// ErrHandedOver is what Run returns once a new master serves: this
	// master drains its workers and exits, keeping every socket file for
	// its successor.
	ErrHandedOver = errors.New("upgrade: a new master took over")
)

// Config configures a Manager.
type Config struct {
	// ReadyTimeout bounds how long a new generation may take to be ready.
	ReadyTimeout time.Duration
	// ReadyHint, if set, is appended to a ready-timeout error (for example
	// a suggestion of --ready=timer:DURATION).
	ReadyHint string
	// Logger receives upgrade events; nil means none.
	Logger hclog.Logger
	// Self, if set, makes master self-upgrades possible and tells systemd
	// about readiness (READY=1, RELOADING=1, MAINPID=).
	Self *Self
	// Finished, if set, is told of every upgrade that finished (not the
	// first start), from the manager's goroutine: it must not block.
	Finished func(control.UpgradeOutcome)
}

// Manager runs the first start and then upgrades, one at a time, from a
// single queue. Its methods are safe for concurrent use.
type Manager struct {
	fl  fleet
	cfg Config
	log hclog.Logger

	ctx      context.Context
	cancel   context.CancelFunc
	wake     chan struct{} // a request was queued
	tookOver atomic.Bool   // the first generation serves

	mu            sync.Mutex
	pending       *request // the one request queued, coalescing later ones
	note          string   // what a running upgrade is doing, for status
	masterFailure *control.MasterUpgradeFailure
	failedBinary  *binaryID // automatic upgrades do not retry it

	// resizeMu is held by a master upgrade from before it exports the
	// worker count until it has failed; replaced is set once one
	// succeeded. A scale in that window would change this master only.
	resizeMu sync.Mutex
	replaced bool
}

type request struct {
	kind    Kind
	at      time.Time
	waiters []waiter
}

// waiter is one caller of Trigger: the kind it asked for decides what it
// is told when a merged request ran as another kind.
type waiter struct {
	kind Kind
	ch   chan Result
}

// rollsWorkers reports whether a waiter asked for a worker rollover
// (Workers, or Auto, which rolls the workers when the master cannot go).
func (r *request) rollsWorkers() bool {
	for _, w := range r.waiters {
		if w.kind != Master {
			return true
		}
	}
	return false
}

// New returns a manager for m.
func New(m *master.Master, cfg Config) *Manager {
	return newManager(realFleet{m}, cfg)
}

func newManager(fl fleet, cfg Config) *Manager {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Manager{fl: fl, cfg: cfg, log: cfg.Logger, ctx: ctx, cancel: cancel, wake: make(chan struct{}, 1)}
}

// Trigger requests an upgrade of the given kind and returns a channel that
// receives its result. It never blocks. The request is queued: if one is
// queued already, the two become one, of the larger kind (Workers < Auto <
// Master), however many arrive meanwhile. A request made before the first
// generation serves waits for it.
func (u *Manager) Trigger(kind Kind) <-chan Result {
	ch := make(chan Result, 1)
	now := time.Now()
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.ctx.Err() != nil || u.fl.stopping() {
		ch <- Result{err: errStopping, requested: now, kind: kind}
		return ch
	}
	if u.pending == nil {
		u.pending = &request{kind: kind, at: now}
		u.log.Info("upgrade queued", "kind", kind.String())
	} else {
		u.pending.kind = max(u.pending.kind, kind)
		u.log.Info("upgrade request coalesced with the queued one", "kind", kind.String(), "queued", u.pending.kind.String())
	}
	u.pending.waiters = append(u.pending.waiters, waiter{kind, ch})
	select {
	case u.wake <- struct{}{}:
	default:
	}
	return ch
}

// Run starts the first generation, then performs queued upgrades until
// Stop. It returns the start's error if the first generation fails (after
// stopping what it started), ErrHandedOver once a master upgrade has
// succeeded, and nil after Stop. Requests still queued then get
// errStopping (or, after a hand-over, an error that names it).
func (u *Manager) Run() error {
	// Once Run returns nothing runs the queue: later requests are answered
	// at once (errStopping), not left waiting.
	defer u.cancel()
	if err := u.start(); err != nil {
		u.flush(errStopping)
		if u.ctx.Err() != nil {
			return nil
		}
		return err
	}
	for {
		select {
		case <-u.ctx.Done():
			u.flush(errStopping)
			return nil
		case <-u.wake:
		}
		if u.ctx.Err() != nil { // a stop and a request arrived together
			u.flush(errStopping)
			return nil
		}
		u.mu.Lock()
		req := u.pending
		u.pending = nil
		u.mu.Unlock()
		if req == nil {
			continue
		}
		res := u.run(req.at, req.kind, req.rollsWorkers())
		if u.cfg.Finished != nil {
			u.cfg.Finished(res.Outcome())
		}
		for _, w := range req.waiters {
			w.ch <- res.forKind(w.kind)
		}
		if res.kind == Master && res.err == nil {
			u.flush(errors.New("the master was replaced; ask the new master"))
			return ErrHandedOver
		}
	}
}

// TookOver reports whether the first generation serves: a successor master
// that has not taken over shares every socket file with the master that
// still serves, and must leave them alone.
func (u *Manager) TookOver() bool { return u.tookOver.Load() }

// Stop interrupts a running start or upgrade (its new generation is
// drained) and makes Run return. It does not block.
func (u *Manager) Stop() { u.cancel() }

// flush answers every queued request with err.
func (u *Manager) flush(err error) {
	u.mu.Lock()
	req := u.pending
	u.pending = nil
	u.mu.Unlock()
	if req != nil {
		for _, w := range req.waiters {
			w.ch <- Result{err: err, requested: req.at, kind: req.kind}
		}
	}
}

// Note says what a running upgrade is doing ("" if none), for status.
func (u *Manager) Note() string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.note
}

func (u *Manager) setNote(s string) {
	u.mu.Lock()
	u.note = s
	u.mu.Unlock()
}

// MasterFailure returns the last failed master upgrade, or nil.
func (u *Manager) MasterFailure() *control.MasterUpgradeFailure {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.masterFailure
}

// start starts the first generation and waits for it. It succeeds once
// every worker is ready, or once the ready timeout passes with at least
// one ready (the rest keep being respawned). It fails, after draining
// whatever it started, if the program cannot be resolved or started, if
// every worker exits before any is ready, or if none is ready in time.
//
// A master that replaces a previous one is stricter: all its workers must
// be ready in time, or it fails and the previous master keeps serving.
// Once the generation serves, start writes the PID file and tells systemd.
func (u *Manager) start() error {
	path, err := u.fl.resolve()
	if err != nil {
		return err
	}
	successor := u.cfg.Self.HasParent()
	g, err := u.fl.startGeneration(path, !successor)
	if err != nil {
		if g != nil {
			g.drain()
		}
		return err
	}
	ctx, cancel := context.WithTimeout(u.ctx, u.cfg.ReadyTimeout)
	defer cancel()
	if successor {
		err = g.waitReady(ctx)
	} else {
		err = g.waitFirst(ctx)
	}
	if err == nil && successor {
		_, err = u.fl.promote(g)
	}
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && u.cfg.ReadyHint != "" {
			err = fmt.Errorf("%w (%s)", err, u.cfg.ReadyHint)
		}
		g.drain()
		return err
	}
	if err := u.cfg.Self.ready(); err != nil {
		// The PID file could not be written, or the previous master could
		// not be told: it will time out and stay; this one must go.
		g.drain()
		return fmt.Errorf("ready: %w", err)
	}
	u.tookOver.Store(true)
	u.log.Info("generation serving", events.Key, events.GenerationServing, "generation", g.number(), "duration", time.Since(g.started()).Round(time.Microsecond), "worker_start", g.readyTiming().Round(time.Microsecond))
	if successor {
		u.log.Info("master upgrade: new master serving", events.Key, events.MasterUpgradeServing, "pid", u.cfg.Self.pid(), "generation", g.number())
	}
	return nil
}

// run performs one upgrade.
//
// An automatic upgrade (HUP) re-execs the master when the gorolling binary
// changed on disk, and otherwise rolls the workers. A broken gorolling
// binary must not block application deploys: when the master upgrade
// fails, the same request rolls the workers instead, and later automatic
// upgrades leave the master alone until the binary changes again. The same
// fallback runs for a master upgrade that absorbed a worker or automatic
// request (fallback): a deploy that asked for new workers gets them even
// if a master upgrade queued beside it fails.
func (u *Manager) run(at time.Time, kind Kind, fallback bool) Result {
	auto := kind == Auto
	fallback = fallback || auto
	if auto {
		kind = Workers
		if u.cfg.Self.binaryChanged() {
			id, ok := u.cfg.Self.onDisk()
			u.mu.Lock()
			failed := ok && u.failedBinary != nil && id == *u.failedBinary
			u.mu.Unlock()
			if failed {
				u.log.Info("the gorolling binary is the one whose master upgrade failed; upgrading the workers only")
			} else {
				u.log.Info("the gorolling binary changed on disk: upgrading the master")
				kind = Master
			}
		}
	}
	u.cfg.Self.notify("RELOADING=1\nSTATUS=upgrading")
	var res Result
	if kind == Master {
		res = u.runMaster(at)
		if res.err != nil && fallback {
			u.log.Warn("master upgrade failed; upgrading the workers instead", events.Key, events.MasterUpgradeFallback, "reason", res.err.Error())
			merr := res.err
			res = u.runWorkers(at)
			res.masterErr = merr
			if res.err != nil {
				res.err = fmt.Errorf("%w (the master upgrade tried first failed too: %v)", res.err, merr)
			}
		}
	} else {
		res = u.runWorkers(at)
	}
	if res.kind == Master && res.err == nil {
		// systemd believes only its main process (NotifyAccess=main), and
		// that is still this master: it names its successor.
		u.cfg.Self.handOver(res.newMaster)
	} else {
		u.cfg.Self.notify("READY=1\nSTATUS=serving")
	}
	u.setNote("")
	return res
}

// Resize runs scale (a change of the worker count) unless a master upgrade
// runs or has replaced this master: the successor takes the count this
// master exports when the upgrade starts, so a change made meanwhile would
// be lost with this master.
func (u *Manager) Resize(scale func() error) error {
	if !u.resizeMu.TryLock() {
		return errors.New("scale: a master upgrade is running; scale again when it is done")
	}
	defer u.resizeMu.Unlock()
	if u.replaced {
		return errors.New("scale: this master was replaced; ask the new master")
	}
	return scale()
}

// runMaster re-execs the master (see Self).
func (u *Manager) runMaster(at time.Time) Result {
	res := Result{requested: at, kind: Master}
	if cur := u.fl.serving(); cur != nil {
		res.from = cur.number()
	}
	if u.cfg.Self == nil {
		res.err = errors.New("master self-upgrade is not available in this process")
		return res
	}
	if u.ctx.Err() != nil {
		res.err = errStopping
		return res
	}
	u.log.Info("master upgrade started", events.Key, events.MasterUpgradeStarted, "from", res.from)
	u.setNote("starting a new master")
	lastGen, lastID := u.fl.counters()
	tried, known := u.cfg.Self.onDisk()
	u.resizeMu.Lock()
	pid, err := u.cfg.Self.upgrade(lastGen, lastID, u.setNote)
	u.replaced = err == nil
	u.resizeMu.Unlock()
	res.finished = time.Since(at)
	if err != nil {
		res.err = err
		u.log.Error("master upgrade failed; this master keeps serving", events.Key, events.MasterUpgradeFailed, "reason", err.Error(), "duration", res.finished.Round(time.Millisecond))
		u.mu.Lock()
		if known {
			u.failedBinary = &tried
		}
		u.masterFailure = &control.MasterUpgradeFailure{Binary: tried.path, Error: err.Error(), At: time.Now()}
		u.mu.Unlock()
		return res
	}
	res.newMaster, res.ready, res.to = pid, res.finished, lastGen+1
	u.log.Info("master upgrade ready: the new master serves; draining this one", events.Key, events.MasterUpgradeReady, "new_pid", pid, "duration", res.finished.Round(time.Millisecond))
	return res
}

// runWorkers performs one worker rollover.
func (u *Manager) runWorkers(at time.Time) Result {
	res := Result{requested: at, kind: Workers}
	if cur := u.fl.serving(); cur != nil {
		res.from = cur.number()
	}
	u.log.Info("upgrade started", events.Key, events.UpgradeStarted, "from", res.from)
	fail := func(g generation, err error) Result {
		res.err = err
		if g != nil {
			res.to = g.number()
			g.drain()
		}
		res.finished = time.Since(at)
		u.log.Error("upgrade rolled back", events.Key, events.UpgradeRolledBack, "generation", res.to, "serving", res.from, "reason", err.Error(), "duration", res.finished.Round(time.Millisecond))
		return res
	}
	if u.ctx.Err() != nil {
		return fail(nil, errStopping)
	}
	path, err := u.fl.resolve()
	if err != nil {
		return fail(nil, err)
	}
	g, err := u.fl.startGeneration(path, false)
	if err != nil {
		return fail(g, err)
	}
	res.to = g.number()
	u.setNote(fmt.Sprintf("starting generation %d", g.number()))
	ctx, cancel := context.WithTimeout(u.ctx, u.cfg.ReadyTimeout)
	err = g.waitReady(ctx)
	cancel()
	if err != nil {
		switch {
		case u.ctx.Err() != nil:
			err = errStopping
		case errors.Is(err, context.DeadlineExceeded):
			err = fmt.Errorf("new generation not ready within %s: %w", u.cfg.ReadyTimeout, err)
			if u.cfg.ReadyHint != "" {
				err = fmt.Errorf("%w (%s)", err, u.cfg.ReadyHint)
			}
		}
		return fail(g, err)
	}
	res.ready = time.Since(at)
	res.workerStart = g.readyTiming()
	old, err := u.fl.promote(g)
	if err != nil {
		return fail(g, err)
	}
	u.log.Info("upgrade ready", events.Key, events.UpgradeReady, "generation", g.number(), "from", res.from,
		"duration", res.ready.Round(time.Microsecond),
		"worker_start", res.workerStart.Round(time.Microsecond),
		"overhead", (res.ready - res.workerStart).Round(time.Microsecond))
	if old != nil {
		u.setNote(fmt.Sprintf("draining generation %d", old.number()))
		old.drain()
	}
	res.finished = time.Since(at)
	u.log.Info("upgrade finished", events.Key, events.UpgradeFinished, "generation", g.number(), "from", res.from,
		"duration", res.finished.Round(time.Millisecond),
		"drain", (res.finished - res.ready).Round(time.Millisecond))
	return res
}
