package master

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/handoff"
	"github.com/gorolling/gorolling/master/account"
	"github.com/gorolling/gorolling/master/events"
	"github.com/gorolling/gorolling/master/placement"
	"github.com/gorolling/gorolling/master/registry"
	"github.com/hashicorp/go-hclog"
)

// Config configures a Master.
type Config struct {
	// Program is the program to run, as the user gave it: a path, or a
	// name looked up in PATH. It is resolved again at every generation.
	Program string
	// Args are the program's arguments (without the program itself).
	Args []string
	// Workers is the number of workers per generation (at least 1).
	Workers int
	// DrainTimeout bounds how long a draining worker may take to exit
	// before it is SIGKILLed.
	DrainTimeout time.Duration
	// StopSignal is sent to draining workers (after the drain message);
	// zero means SIGTERM.
	StopSignal syscall.Signal
	// Logger receives the master's logs; nil means none.
	Logger hclog.Logger
	// Registry holds the sockets workers get. The caller owns it and
	// closes it after Stop.
	Registry *registry.Registry
	// Shim is the command that sets LISTEN_PID to its own pid and then
	// execs the program; the master appends "PATH ARGV0 ARGS...". It is
	// needed when the registry has --listen sockets.
	Shim []string
	// ReadyTimer, if positive, marks a worker ready that long after it
	// started, for programs that cannot signal readiness at all. Explicit
	// readiness (handoff or READY=1) still counts if it comes first.
	ReadyTimer time.Duration
	// Account, if set, is the account workers run as (--user/--group).
	Account *account.Account
	// LastGeneration and LastWorkerID continue a predecessor's numbering
	// (a master self-upgrade): generation numbers and worker ids never
	// repeat within a service.
	LastGeneration, LastWorkerID int
	// Dir, if set, is the workers' working directory, an absolute path
	// that each generation resolves through its symlinks when it starts, so
	// that a symlink in it switched to a new release (current ->
	// releases/N) takes effect at the next generation, while the workers
	// of a running one (respawns included) stay in theirs; a relative
	// Program with a '/' is resolved in it too. Empty means the master's
	// working directory as it was at New.
	Dir string
	// Output says how the workers' output reaches the master's stdout and
	// stderr: as they wrote it (the default), or relayed line by line and
	// attributed to the worker. Relayed output passes through the master:
	// if the master dies, its workers' next writes to stdout or stderr
	// fail (EPIPE; a Go program dies of SIGPIPE writing to fd 1 or 2).
	Output Output
	// ReapOrphans makes the master reap every orphan re-parented to it, as
	// an init must: set it when the master is pid 1 (a container's init).
	ReapOrphans bool
	// Placer, if set, steers new connections of the registry's reuseport
	// groups round-robin over the slots whose workers are ready (see
	// package placement). The caller owns it.
	Placer *placement.Placer
	// Changed, if set, is called after every change of the master's state
	// (a worker started, ready or gone, a generation started or drained,
	// the size changed), with the master's lock held: it must neither
	// block nor call the master.
	Changed func()

	// start starts worker processes (tests replace it).
	start starter
	// clock schedules respawns (tests replace it).
	clock clock
	// runtimeDir, if set, holds the workers' notify sockets (tests set
	// it); otherwise a new private directory under $XDG_RUNTIME_DIR or the
	// temp directory does, removed at Stop.
	runtimeDir string
	// The workers' base environment (the master's own protocols' variables
	// left out), working directory and output: the master's.
	env            []string
	dir            string
	stdout, stderr *os.File
}

// Master supervises generations of workers. Create one with New; its
// methods are safe for concurrent use.
type Master struct {
	cfg       Config
	log       hclog.Logger
	reg       *registry.Registry
	runDir    string
	ownRunDir bool

	mu      sync.Mutex
	changed chan struct{} // closed and replaced at every state change
	gens    []*Generation // live generations, oldest first
	serving *Generation
	lastGen int
	nextID  int

	relays          map[uint64]*relay // connection offers in flight, by number
	nextConn        uint64
	connsHandedOver int64 // connections a worker took from another
	connsReturned   int64 // connections no worker took: back to their sender
	workers         int
	stopping        bool
	stopped         chan struct{}
}

// errNoProgram is returned by New when Config.Program is empty.
var errNoProgram = errors.New("master: no program to run")

// New checks cfg and returns a master with no workers yet. Start the first
// generation with StartGeneration.
func New(cfg Config) (*Master, error) {
	if cfg.Program == "" {
		return nil, errNoProgram
	}
	if cfg.Workers < 1 || cfg.Workers > MaxWorkers {
		return nil, fmt.Errorf("master: workers must be 1 to %d, got %d", MaxWorkers, cfg.Workers)
	}
	if cfg.DrainTimeout <= 0 {
		return nil, errors.New("master: the drain timeout must be positive")
	}
	if cfg.Registry == nil {
		return nil, errors.New("master: no registry")
	}
	if len(cfg.Registry.Preopened()) > 0 && len(cfg.Shim) == 0 {
		return nil, errors.New("master: pre-opened listeners need Config.Shim to set LISTEN_PID")
	}
	if cfg.StopSignal == 0 {
		cfg.StopSignal = syscall.SIGTERM
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	cfg.env, cfg.stdout, cfg.stderr = os.Environ(), os.Stdout, os.Stderr
	wd, err := os.Getwd()
	if err != nil {
		return nil, fmt.Errorf("master: working directory: %w", err)
	}
	cfg.dir = wd
	if cfg.Dir != "" {
		if !filepath.IsAbs(cfg.Dir) {
			return nil, fmt.Errorf("master: Dir %q is not absolute", cfg.Dir)
		}
		cfg.dir = cfg.Dir
	}
	if cfg.start == nil {
		cfg.start = execStarter(cfg.ReapOrphans, cfg.Logger)
	}
	if cfg.clock == nil {
		cfg.clock = realClock{}
	}
	m := &Master{
		cfg:     cfg,
		log:     cfg.Logger,
		reg:     cfg.Registry,
		changed: make(chan struct{}),
		lastGen: cfg.LastGeneration,
		nextID:  cfg.LastWorkerID,
		workers: cfg.Workers,
		stopped: make(chan struct{}),
		relays:  make(map[uint64]*relay),
	}
	if err := m.makeRunDir(); err != nil {
		return nil, err
	}
	return m, nil
}

// makeRunDir creates (or checks) the private directory of notify sockets.
func (m *Master) makeRunDir() error {
	if m.cfg.runtimeDir != "" {
		if err := os.MkdirAll(m.cfg.runtimeDir, 0o700); err != nil {
			return fmt.Errorf("master: runtime directory: %w", err)
		}
		m.runDir = m.cfg.runtimeDir
		return nil
	}
	base := os.Getenv("XDG_RUNTIME_DIR")
	if fi, err := os.Stat(base); base == "" || err != nil || !fi.IsDir() {
		base = os.TempDir()
	}
	d, err := os.MkdirTemp(base, "gorolling-")
	if err != nil {
		return fmt.Errorf("master: runtime directory: %w", err)
	}
	m.runDir, m.ownRunDir = d, true
	if m.cfg.Account != nil {
		// Workers of another user must reach their own notify socket (each
		// is theirs, 0600); the directory stays unlistable.
		if err := os.Chmod(d, 0o711); err != nil {
			os.RemoveAll(d)
			return fmt.Errorf("master: runtime directory: %w", err)
		}
	}
	return nil
}

// Resolve finds the program as it is on disk now, as an absolute path: a
// name without a slash is looked up in PATH, a relative path is taken from
// the master's working directory. The result is what a new generation
// runs, so a binary replaced since the last generation is picked up.
func (m *Master) Resolve() (string, error) {
	p := m.cfg.Program
	if m.cfg.Dir != "" && strings.Contains(p, "/") && !filepath.IsAbs(p) {
		// Joined, not resolved: the exec follows the symlinks as they are
		// at that moment.
		p = filepath.Join(m.cfg.Dir, p)
	}
	lp, err := exec.LookPath(p)
	if err != nil {
		switch {
		case errors.Is(err, exec.ErrNotFound), errors.Is(err, os.ErrNotExist):
			return "", fmt.Errorf("program %q not found", p)
		case errors.Is(err, os.ErrPermission):
			return "", fmt.Errorf("program %q is not executable", p)
		}
		return "", fmt.Errorf("program %q: %w", p, err)
	}
	abs, err := filepath.Abs(lp)
	if err != nil {
		return "", fmt.Errorf("program %q: %w", p, err)
	}
	if fi, err := os.Stat(abs); err == nil && fi.IsDir() {
		return "", fmt.Errorf("program %q is a directory", p)
	}
	return abs, nil
}

// Counters returns the last generation number and worker id used, for a
// successor master to continue from.
func (m *Master) Counters() (lastGeneration, lastWorkerID int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.lastGen, m.nextID
}

// Serving returns the serving generation, or nil.
func (m *Master) Serving() *Generation {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.serving
}

// Promote makes g, which StartGeneration started and WaitReady found
// ready, the serving generation, and returns the generation it replaces
// (nil if none), which the caller drains. From now on g's crashed workers
// are respawned.
func (m *Master) Promote(g *Generation) (*Generation, error) {
	m.mu.Lock()
	if g.state != genStarting && g.state != genServing {
		m.mu.Unlock()
		return nil, fmt.Errorf("promote generation %d: it is %s", g.Num, g.state)
	}
	old := m.serving
	if old == g {
		m.mu.Unlock()
		return nil, nil
	}
	g.state = genServing
	m.serving = g
	m.notifyLocked()
	m.mu.Unlock()
	if old == nil {
		// The first generation of this master: sockets it started with
		// that none of its workers asked for (a successor's inheritance,
		// or what the fd store kept, from a release that listened on
		// more) would otherwise stay bound, queueing connections nobody
		// accepts, until the next drain. With an old generation, its
		// drain collects them.
		m.collect()
	}
	return old, nil
}

// Stop drains every generation (SIGKILL after the drain timeout), stops
// respawning, and removes the runtime directory. It blocks until every
// worker has been reaped and is idempotent: later calls wait for the
// first. The registry's sockets are the caller's to close.
func (m *Master) Stop() {
	m.mu.Lock()
	if m.stopping {
		m.mu.Unlock()
		<-m.stopped
		return
	}
	m.stopping = true
	gens := append([]*Generation(nil), m.gens...)
	m.notifyLocked()
	m.mu.Unlock()
	m.log.Info("stopping", events.Key, events.MasterStopping, "generations", len(gens), "drain_timeout", m.cfg.DrainTimeout)
	var wg sync.WaitGroup
	for _, g := range gens {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g.Drain()
		}()
	}
	wg.Wait()
	if m.ownRunDir {
		os.RemoveAll(m.runDir)
	}
	m.log.Info("stopped", events.Key, events.MasterStopped)
	close(m.stopped)
}

// Stopping reports whether Stop has begun.
func (m *Master) Stopping() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stopping
}

// Kill SIGKILLs every worker now; a running Stop then finishes at once.
func (m *Master) Kill() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, g := range m.gens {
		for w := range g.running {
			w.proc.Signal(syscall.SIGKILL)
		}
	}
}

// Done is closed when Stop has finished.
func (m *Master) Done() <-chan struct{} { return m.stopped }

// notifyLocked wakes every waitFor. Called with m.mu held.
func (m *Master) notifyLocked() {
	close(m.changed)
	m.changed = make(chan struct{})
	m.placeLocked()
	if m.cfg.Changed != nil {
		m.cfg.Changed()
	}
}

// placeLocked tells the placer which members of each reuseport group get
// new connections: those whose slot has a ready worker in a generation
// that is not draining. Called with m.mu held.
func (m *Master) placeLocked() {
	if m.cfg.Placer == nil || m.stopping {
		return
	}
	active := map[handoff.Key]bool{}
	for _, g := range m.gens {
		if g.state >= genDraining {
			continue
		}
		for _, s := range g.slots {
			if w := s.w; w != nil && w.state == workerReadyState {
				for k := range w.keys {
					if k.Member > 0 {
						active[k] = true
					}
				}
			}
		}
	}
	m.reg.Members(func(groups map[string][]registry.Member) {
		in := make(map[string][]placement.Member, len(groups))
		for name, ms := range groups {
			for _, x := range ms {
				in[name] = append(in[name], placement.Member{Slot: x.Key.Member - 1, FD: x.FD, Active: active[x.Key]})
			}
		}
		for name, ms := range in {
			n := 0
			for _, x := range ms {
				if x.Active {
					n++
				}
			}
			m.log.Debug("placement updated", events.Key, events.PlacementUpdated, "group", name, "members", len(ms), "active", n)
		}
		switch err := m.cfg.Placer.Sync(in); {
		case errors.Is(err, placement.ErrUnavailable):
			m.log.Warn("connections are spread by the kernel's hash instead of evenly", events.Key, events.PlacementUnavailable, "error", err)
		case err != nil:
			m.log.Warn("placement: a reuseport group was not updated", "error", strings.ReplaceAll(err.Error(), "\n", "; "))
		}
	})
}

// waitFor re-evaluates cond (under m.mu) after every state change until it
// reports done, or done is closed; then onTimeout (under m.mu, may be nil:
// errTimeout) decides the error.
func (m *Master) waitFor(done <-chan struct{}, cond func() (bool, error), onTimeout func() error) error {
	for {
		m.mu.Lock()
		ok, err := cond()
		ch := m.changed
		m.mu.Unlock()
		if ok {
			return err
		}
		select {
		case <-ch:
		case <-done:
			m.mu.Lock()
			defer m.mu.Unlock()
			if ok, err := cond(); ok { // it may have settled meanwhile
				return err
			}
			if onTimeout == nil {
				return errTimeout
			}
			return onTimeout()
		}
	}
}

var errTimeout = errors.New("master: timed out")
