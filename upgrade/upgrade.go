// Package upgrade owns generation rollover and the master's self-upgrade.
//
// Rollover: it starts the first generation, and on each request starts
// generation G+1 from the program as it is on disk now, waits until every
// new worker is ready, then drains generation G. A new worker that exits or
// misses the ready timeout rolls the upgrade back: G+1 is drained and G
// keeps serving. Requests that arrive while an upgrade runs are coalesced
// into one more upgrade after it.
//
// Self-upgrade (Self): the master re-execs itself with cloudflare/tableflip
// and hands its sockets to the new master, which starts its own generation;
// once that is ready the old master drains its workers and exits. A new
// master that fails leaves the old one serving.
//
// The package decides policy only; it never opens, binds or accepts on a
// socket: the master package owns them.
package upgrade

import (
	"context"
	"errors"
	"fmt"
	"os"
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
	// Self, if set, makes master self-upgrades possible and tells systemd
	// about readiness (READY=1, RELOADING=1, MAINPID=).
	Self *Self
}

// Result reports one finished upgrade.
type Result struct {
	// Kind is what was upgraded: "workers" or "master".
	Kind string
	// NewMaster is the new master's pid after a master upgrade.
	NewMaster int
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
	// MasterErr, for an automatic upgrade that fell back to the workers, is
	// why the master upgrade it tried first failed.
	MasterErr error
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

	// failedBinary is the gorolling binary whose master upgrade failed
	// last: automatic upgrades do not try it again. Only the upgrade loop
	// touches it.
	failedBinary *binaryID

	mu             sync.Mutex
	running        bool
	pending        bool
	pendingKind    master.UpgradeKind
	pendingAt      time.Time
	pendingWaiters []chan Result
	last           *Result
	handedOver     bool
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
//
// A master that replaces a previous one (Self.HasParent) is stricter: all
// its workers must be ready in time, or it fails and the previous master
// keeps serving. Once the generation serves, Start writes the PID file and
// tells systemd (READY=1, and MAINPID= after a self-upgrade).
func (u *Manager) Start() (*master.Generation, error) {
	path, err := u.m.Resolve()
	if err != nil {
		return nil, err
	}
	successor := u.cfg.Self != nil && u.cfg.Self.HasParent()
	g, err := u.m.StartGeneration(path, !successor)
	if err != nil {
		if g != nil {
			g.Drain(u.cfg.DrainTimeout)
		}
		return nil, err
	}
	ctx, cancel := context.WithTimeout(u.ctx, u.cfg.ReadyTimeout)
	defer cancel()
	if successor {
		err = g.WaitReady(ctx)
	} else {
		err = g.WaitFirst(ctx)
	}
	if err == nil && successor {
		_, err = u.m.Promote(g)
	}
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && u.cfg.ReadyHint != "" {
			err = fmt.Errorf("%w (%s)", err, u.cfg.ReadyHint)
		}
		g.Drain(u.cfg.DrainTimeout)
		return nil, err
	}
	slowest, _ := g.ReadyTiming()
	if u.cfg.Self != nil {
		if err := u.cfg.Self.ready(); err != nil {
			// The PID file could not be written, or the previous master
			// could not be told: it will time out and stay; we must go.
			g.Drain(u.cfg.DrainTimeout)
			return nil, fmt.Errorf("ready: %w", err)
		}
	}
	u.m.TookOver()
	// Logged once the PID file names this master.
	u.log.Info("generation serving", "generation", g.Num, "duration", time.Since(g.Started).Round(time.Microsecond), "worker_start", slowest.Round(time.Microsecond))
	if successor {
		u.log.Info("master upgrade: new master serving", "pid", os.Getpid(), "generation", g.Num)
	}
	return g, nil
}

// Trigger requests an upgrade of the given kind and returns a channel that
// receives its result. If none runs, one starts now. If one runs, the
// request joins the single upgrade queued after it (its program may have
// been resolved before the new binary was in place), however many requests
// arrive meanwhile; a queued master upgrade absorbs worker upgrades, since
// a new master starts a new generation too.
func (u *Manager) Trigger(kind master.UpgradeKind) <-chan Result {
	now := time.Now()
	ch := make(chan Result, 1)
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.ctx.Err() != nil || u.m.Stopping() {
		ch <- Result{Err: ErrStopping, Requested: now, Kind: kind.String()}
		return ch
	}
	if u.running {
		if u.pending {
			u.log.Info("upgrade request coalesced with the queued one", "kind", kind.String())
			if kind == master.UpgradeMaster {
				u.pendingKind = kind
			}
		} else {
			u.pending, u.pendingAt, u.pendingKind = true, now, kind
			u.log.Info("upgrade queued: another is in progress", "kind", kind.String())
		}
		u.pendingWaiters = append(u.pendingWaiters, ch)
		return ch
	}
	u.running = true
	u.wg.Add(1)
	go u.loop(now, kind, []chan Result{ch})
	return ch
}

// Outcome is Trigger for the master's hooks: the result as the control
// socket reports it.
func (u *Manager) Outcome(kind master.UpgradeKind) <-chan master.UpgradeOutcome {
	out := make(chan master.UpgradeOutcome, 1)
	res := u.Trigger(kind)
	go func() {
		r := <-res
		o := master.UpgradeOutcome{Kind: r.Kind, From: r.From, To: r.To, OK: r.Err == nil,
			DurationMS: r.Finished.Milliseconds(), NewPID: r.NewMaster}
		if r.Err != nil {
			o.Error = r.Err.Error()
		}
		if r.MasterErr != nil {
			o.MasterError = r.MasterErr.Error()
		}
		out <- o
	}()
	return out
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

func (u *Manager) loop(at time.Time, kind master.UpgradeKind, waiters []chan Result) {
	defer u.wg.Done()
	for {
		res := u.run(at, kind)
		u.mu.Lock()
		u.last = &res
		for _, w := range waiters {
			w <- res
		}
		if res.Kind == "master" && res.Err == nil {
			// A new master serves: hand over and refuse anything queued.
			u.handedOver = true
			u.running = false
			pend := u.pendingWaiters
			u.pending, u.pendingWaiters = false, nil
			u.mu.Unlock()
			for _, w := range pend {
				w <- Result{Err: errors.New("the master was replaced; ask the new master"), Requested: at, Kind: "master"}
			}
			u.cancel()
			go u.m.Handover()
			return
		}
		if !u.pending {
			u.running = false
			u.mu.Unlock()
			return
		}
		at, kind, waiters = u.pendingAt, u.pendingKind, u.pendingWaiters
		u.pending, u.pendingWaiters = false, nil
		if u.ctx.Err() != nil {
			u.running = false
			u.mu.Unlock()
			for _, w := range waiters {
				w <- Result{Err: ErrStopping, Requested: at, Kind: kind.String()}
			}
			return
		}
		u.mu.Unlock()
	}
}

// run performs one upgrade.
//
// An automatic upgrade (HUP) re-execs the master when the gorolling binary
// changed on disk, and otherwise rolls the workers. A broken gorolling
// binary must not block application deploys: when the master upgrade
// fails, the same request rolls the workers instead, and later automatic
// upgrades leave the master alone until the binary changes again.
func (u *Manager) run(at time.Time, kind master.UpgradeKind) Result {
	auto := kind == master.UpgradeAuto
	if auto {
		kind = master.UpgradeWorkers
		if u.cfg.Self != nil && u.cfg.Self.BinaryChanged() {
			if id, ok := u.cfg.Self.onDisk(); ok && u.failedBinary != nil && id == *u.failedBinary {
				u.log.Info("the gorolling binary is the one whose master upgrade failed; upgrading the workers only")
			} else {
				u.log.Info("the gorolling binary changed on disk: upgrading the master")
				kind = master.UpgradeMaster
			}
		}
	}
	u.cfg.Self.sdNotify("RELOADING=1\nSTATUS=upgrading")
	var res Result
	if kind == master.UpgradeMaster {
		res = u.runMaster(at)
		if res.Err != nil && auto {
			u.log.Warn("master upgrade failed; upgrading the workers instead", "reason", res.Err.Error())
			merr := res.Err
			res = u.runWorkers(at)
			res.MasterErr = merr
			if res.Err != nil {
				res.Err = fmt.Errorf("%w (the master upgrade tried first failed too: %v)", res.Err, merr)
			}
		}
	} else {
		res = u.runWorkers(at)
	}
	if res.Kind == "master" && res.Err == nil {
		// systemd believes only its main process (NotifyAccess=main), and
		// that is still this master: it names its successor.
		u.cfg.Self.sdNotify(fmt.Sprintf("MAINPID=%d\nREADY=1\nSTATUS=serving", res.NewMaster))
	} else {
		u.cfg.Self.sdNotify("READY=1\nSTATUS=serving")
	}
	u.m.SetUpgradeNote("")
	return res
}

// runMaster re-execs the master (see Self).
func (u *Manager) runMaster(at time.Time) Result {
	res := Result{Requested: at, Kind: "master"}
	if cur := u.m.Serving(); cur != nil {
		res.From = cur.Num
	}
	if u.cfg.Self == nil {
		res.Err = errors.New("master self-upgrade is not available in this process")
		return res
	}
	u.log.Info("master upgrade started", "from", res.From)
	u.m.SetUpgradeNote("starting a new master")
	next := u.m.LastGeneration() + 1
	tried, known := u.cfg.Self.onDisk()
	pid, err := u.cfg.Self.upgrade(u.m)
	res.Finished = time.Since(at)
	if err != nil {
		res.Err = err
		u.log.Error("master upgrade failed; this master keeps serving", "reason", err.Error(), "duration", res.Finished.Round(time.Millisecond))
		if known {
			u.failedBinary = &tried
		}
		u.m.SetMasterUpgradeFailure(&master.MasterUpgradeFailure{Binary: tried.path, Error: err.Error(), At: time.Now()})
		return res
	}
	res.NewMaster = pid
	res.Ready = res.Finished
	res.To = next
	u.log.Info("master upgrade ready: the new master serves; draining this one", "new_pid", pid, "duration", res.Finished.Round(time.Millisecond))
	return res
}

// runWorkers performs one worker rollover.
func (u *Manager) runWorkers(at time.Time) Result {
	res := Result{Requested: at, Kind: "workers"}
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
	u.m.SetUpgradeNote(fmt.Sprintf("starting generation %d", g.Num))
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
		u.m.SetUpgradeNote(fmt.Sprintf("draining generation %d", old.Num))
		old.Drain(u.cfg.DrainTimeout)
	}
	res.Finished = time.Since(at)
	u.log.Info("upgrade finished", "generation", g.Num, "from", res.From,
		"duration", res.Finished.Round(time.Millisecond),
		"drain", (res.Finished - res.Ready).Round(time.Millisecond))
	return res
}
