package master

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// Config configures a Master.
type Config struct {
	// Program is the program to run, as the user gave it: a path, or a
	// name looked up in PATH. It is resolved again at every generation.
	Program string
	// Args are the program's arguments (without the program itself).
	Args []string
	// Dir is the workers' working directory; empty means the master's.
	Dir string
	// Env is the base environment for workers; nil means os.Environ().
	// WorkerEnv filters it.
	Env []string
	// Workers is the number of workers per generation (at least 1).
	Workers int
	// ReadyTimeout bounds how long a new generation may take to be ready.
	ReadyTimeout time.Duration
	// DrainTimeout bounds how long a draining worker may take to exit
	// before it is SIGKILLed.
	DrainTimeout time.Duration
	// StopSignal is sent to draining workers (after the drain message).
	StopSignal syscall.Signal
	// Logger receives the master's logs; nil means no logs.
	Logger hclog.Logger
	// Stdout and Stderr are the workers' output; nil means the master's.
	Stdout, Stderr *os.File
	// Inherited are socket descriptors the master inherited (from systemd
	// or a shell) that workers may ask for with ListenFD. The registry
	// takes them over.
	Inherited []InheritedFD
	// Listen are the pre-opened listeners (--listen), passed to every
	// worker as fds 3..3+L-1 with LISTEN_FDS and LISTEN_FDNAMES.
	Listen []ListenSpec
	// Shim is the command that sets LISTEN_PID to its own pid and then
	// execs the program; the master appends "PATH ARGV0 ARGS...". It is
	// needed when Listen is not empty ("gorolling _shim").
	Shim []string
	// ReadyTimer, if positive, marks a worker ready that long after it
	// started, for programs that cannot signal readiness at all. Explicit
	// readiness (handoff or READY=1) still counts if it comes first.
	ReadyTimer time.Duration
	// RuntimeDir is a private directory for the workers' notify sockets;
	// empty means a new one under $XDG_RUNTIME_DIR or the temp directory,
	// removed at stop.
	RuntimeDir string
	// Control is the control socket's path; empty means none.
	Control string
	// ReusePort gives every slot its own SO_REUSEPORT socket for the TCP
	// listeners workers ask for (not for pre-opened or inherited ones),
	// which the slot's replacements and successors inherit: the kernel
	// spreads connections evenly over the slots. The default, one shared
	// socket, lets the busiest worker take more.
	ReusePort bool
	// Account, if set, is the user and groups the workers run as
	// (--user/--group). The master keeps its own privileges; unix socket
	// files and notify sockets it makes for workers are given to the
	// account, and workers may not ask for sockets the account could not
	// bind itself (privileged ports, unix paths in directories it cannot
	// write) unless the master already holds them (--listen).
	Account *Account
	// MaxSockets bounds the sockets the registry opens on workers'
	// requests (0: no bound); a listen past it fails with ENFILE.
	MaxSockets int
	// Version is reported by Status.
	Version string
	// Restore, from a predecessor master (self-upgrade), replaces Inherited
	// and Listen: its sockets, keys and counters are taken over.
	Restore *Restore
}

// InheritedFD is one inherited socket and its name, if it has one.
type InheritedFD struct {
	FD   int
	Name string
}

// Master supervises generations of workers and owns the listener registry.
// Create one with New; its methods are safe for concurrent use.
type Master struct {
	cfg     Config
	log     hclog.Logger
	reg     *Registry
	spawner *spawner
	started time.Time

	// preopened sockets are passed to every worker as fds 3..3+L-1.
	preopened []*Socket
	runDir    string
	ownRunDir bool

	control *controlServer
	hooks   Hooks
	stopReq chan struct{}

	mu             sync.Mutex
	serviceStarted time.Time // when the first master of this service started
	successor      bool      // started by a predecessor's self-upgrade
	tookOver       bool      // ... and its first generation served
	masterUpgrades int
	upgradeNote    string
	masterFailure  *MasterUpgradeFailure
	changed        chan struct{}
	gens           []*Generation // live generations, oldest first
	serving        *Generation
	lastGen        int
	nextID         int
	workers        int
	stopping       bool
	stopped        chan struct{}
}

// Errors from New.
var (
	// ErrNoProgram is returned when Config.Program is empty.
	ErrNoProgram = errors.New("master: no program to run")
)

// New checks cfg, adopts the inherited sockets and returns a master with no
// workers yet. Start the first generation with StartGeneration (the upgrade
// package does), then call Run.
func New(cfg Config) (*Master, error) {
	if cfg.Program == "" {
		return nil, ErrNoProgram
	}
	if cfg.Workers < 1 {
		return nil, fmt.Errorf("master: workers must be at least 1, got %d", cfg.Workers)
	}
	if cfg.ReadyTimeout <= 0 || cfg.DrainTimeout <= 0 {
		return nil, errors.New("master: ready and drain timeouts must be positive")
	}
	if cfg.StopSignal == 0 {
		cfg.StopSignal = syscall.SIGTERM
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Env == nil {
		cfg.Env = os.Environ()
	}
	if cfg.Stdout == nil {
		cfg.Stdout = os.Stdout
	}
	if cfg.Stderr == nil {
		cfg.Stderr = os.Stderr
	}
	if cfg.Dir == "" {
		wd, err := os.Getwd()
		if err != nil {
			return nil, fmt.Errorf("master: working directory: %w", err)
		}
		cfg.Dir = wd
	}
	m := &Master{
		cfg:     cfg,
		log:     cfg.Logger,
		reg:     newRegistry(cfg.Account),
		spawner: newSpawner(),
		started: time.Now(),
		changed: make(chan struct{}),
		workers: cfg.Workers,
		stopped: make(chan struct{}),
		stopReq: make(chan struct{}, 1),
	}
	m.serviceStarted = m.started
	m.reg.reuseport = cfg.ReusePort
	m.reg.max = cfg.MaxSockets
	if cfg.ReusePort {
		b, _ := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
		v := strings.TrimSpace(string(b))
		if v == "1" {
			m.log.Info("reuseport mode", "tcp_migrate_req", v)
		} else {
			m.log.Warn("reuseport mode: net.ipv4.tcp_migrate_req is not 1, so connections queued on a slot's socket are reset when scaling down removes the slot (upgrades keep every socket)", "tcp_migrate_req", v)
		}
	}
	controlFD := -1
	m.successor = cfg.Restore != nil
	if cfg.Restore != nil {
		var err error
		if controlFD, err = m.restore(cfg.Restore); err != nil {
			return nil, err
		}
		m.log.Info("state taken over from the previous master", "sockets", len(cfg.Restore.FDs), "last_generation", m.lastGen)
		cfg.Inherited, cfg.Listen = nil, nil
	}
	for _, in := range cfg.Inherited {
		s, err := m.reg.Adopt(in.FD, in.Name)
		if err != nil {
			return nil, fmt.Errorf("master: %w", err)
		}
		m.log.Info("inherited socket adopted", "fd", in.FD, "addr", s.Addr, "network", s.Network, "name", in.Name)
	}
	if len(cfg.Listen) > 0 && len(cfg.Shim) == 0 {
		return nil, errors.New("master: pre-opened listeners need Config.Shim to set LISTEN_PID")
	}
	for _, ls := range cfg.Listen {
		s, err := m.reg.Preopen(ls)
		if err != nil {
			m.reg.Close(true)
			return nil, err
		}
		if s.Name == "" {
			s.Name = "unknown"
		}
		m.preopened = append(m.preopened, s)
		m.log.Info("listener pre-opened", "spec", ls.Spec, "addr", s.Addr, "network", s.Network, "name", s.Name, "fd", 2+len(m.preopened))
	}
	if err := m.makeRunDir(); err != nil {
		m.reg.Close(true)
		return nil, err
	}
	if cfg.Control != "" {
		if err := m.openControl(cfg.Control, controlFD); err != nil {
			m.reg.Close(cfg.Restore == nil)
			if m.ownRunDir {
				os.RemoveAll(m.runDir)
			}
			return nil, fmt.Errorf("master: %w", err)
		}
	} else if controlFD >= 0 {
		unix.Close(controlFD)
	}
	return m, nil
}

// makeRunDir creates (or checks) the private directory of notify sockets.
func (m *Master) makeRunDir() error {
	if m.cfg.RuntimeDir != "" {
		if err := os.MkdirAll(m.cfg.RuntimeDir, 0o700); err != nil {
			return fmt.Errorf("master: runtime directory: %w", err)
		}
		m.runDir = m.cfg.RuntimeDir
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
	if m.cfg.Account.credential() != nil {
		// Workers of another user must reach their own notify socket (each
		// is theirs, 0600); the directory stays unlistable.
		if err := os.Chmod(d, 0o711); err != nil {
			return fmt.Errorf("master: runtime directory: %w", err)
		}
	}
	return nil
}

// Preopened returns the pre-opened listeners in LISTEN_FDS order.
func (m *Master) Preopened() []*Socket { return m.preopened }

// Config returns the master's configuration, defaults applied.
func (m *Master) Config() Config { return m.cfg }

// Logger returns the master's logger.
func (m *Master) Logger() hclog.Logger { return m.log }

// Registry returns the master's listener registry.
func (m *Master) Registry() *Registry { return m.reg }

// Resolve finds the program as it is on disk now, as an absolute path: a
// name without a slash is looked up in PATH, a relative path is taken from
// the master's working directory. The result is what a new generation
// runs, so a binary replaced since the last generation is picked up.
func (m *Master) Resolve() (string, error) {
	p := m.cfg.Program
	lp, err := exec.LookPath(p)
	if err != nil {
		var ee *exec.Error
		if errors.As(err, &ee) && errors.Is(ee.Err, exec.ErrNotFound) {
			return "", fmt.Errorf("program %q not found", p)
		}
		if errors.Is(err, os.ErrPermission) {
			return "", fmt.Errorf("program %q is not executable", p)
		}
		if errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("program %q not found", p)
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

// TookOver records that this master, a successor, now serves: from now on
// its final stop removes the socket files, as the first master's would.
func (m *Master) TookOver() {
	m.mu.Lock()
	m.tookOver = true
	m.mu.Unlock()
}

// LastGeneration returns the number of the newest generation started.
func (m *Master) LastGeneration() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.lastGen
}

// Serving returns the serving generation, or nil.
func (m *Master) Serving() *Generation {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.serving
}

// Promote makes g the serving generation and returns the generation it
// replaces (nil if none). From now on g's crashed workers are respawned.
func (m *Master) Promote(g *Generation) (*Generation, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if g.state != GenStarting && g.state != GenServing {
		return nil, fmt.Errorf("promote generation %d: it is %s", g.Num, g.state)
	}
	old := m.serving
	if old == g {
		return nil, nil
	}
	g.state = GenServing
	m.serving = g
	m.notifyLocked()
	return old, nil
}

// Stopping reports whether Stop has begun.
func (m *Master) Stopping() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stopping
}

// Stop drains every generation within the drain timeout (SIGKILL after
// it), then closes every listener and the control socket and removes the
// unix socket files the master created. It blocks until done and is
// idempotent: later calls wait for the first.
func (m *Master) Stop() { m.stop(true) }

// Handover is Stop for a master that a successor has replaced: it drains
// its own workers the same way (only it can reap them), but leaves every
// socket file in place, since the successor holds the same sockets.
func (m *Master) Handover() { m.stop(false) }

func (m *Master) stop(final bool) {
	m.mu.Lock()
	if m.stopping {
		m.mu.Unlock()
		<-m.stopped
		return
	}
	m.stopping = true
	gens := append([]*Generation(nil), m.gens...)
	// A successor master that never took over (its start failed) shares
	// every socket file with the master that goes on serving: it must not
	// remove them.
	if m.successor && !m.tookOver {
		final = false
	}
	m.notifyLocked()
	m.mu.Unlock()
	if final {
		m.log.Info("stopping", "generations", len(gens), "drain_timeout", m.cfg.DrainTimeout)
	} else {
		m.log.Info("handing over to the new master; draining this master's workers", "generations", len(gens), "drain_timeout", m.cfg.DrainTimeout)
	}
	if m.control != nil {
		m.control.close(final)
	}
	var wg sync.WaitGroup
	for _, g := range gens {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g.Drain(m.cfg.DrainTimeout)
		}()
	}
	wg.Wait()
	if m.control != nil {
		// Let answers in flight (an "upgrade --wait" told that this master
		// was replaced, say) reach their clients before the process exits.
		m.control.wait(5 * time.Second)
	}
	m.reg.Close(final)
	if m.ownRunDir {
		os.RemoveAll(m.runDir)
	}
	m.log.Info("stopped")
	close(m.stopped)
}

// Kill SIGKILLs every worker now; a running Stop then finishes at once.
func (m *Master) Kill() {
	m.mu.Lock()
	gens := append([]*Generation(nil), m.gens...)
	m.mu.Unlock()
	for _, g := range gens {
		g.Kill()
	}
}

// Done is closed when Stop has finished.
func (m *Master) Done() <-chan struct{} { return m.stopped }

// Hooks are the actions Run takes that belong to other packages.
type Hooks struct {
	// Start starts the first generation and returns once it serves (the
	// upgrade package's Manager.Start). Run calls it after it has begun
	// catching signals, so a signal during start-up is handled, not fatal.
	Start func() error
	// Serving is called once Start has succeeded.
	Serving func()
	// Upgrade starts (or queues) an upgrade and returns a channel that
	// receives its outcome (SIGHUP: auto, SIGUSR2: master, control).
	Upgrade func(UpgradeKind) <-chan UpgradeOutcome
	// Stopping is called once when a stop begins, before the workers are
	// drained, so that a start or an upgrade in progress can give up.
	Stopping func()
}

// Run catches signals, calls h.Start, and then handles signals and control
// requests until the master has stopped:
//
//	HUP        h.Upgrade(UpgradeAuto): re-exec the master if its binary
//	           changed on disk, else a new generation of workers
//	USR2       h.Upgrade(UpgradeMaster): re-exec the master
//	TERM, INT  graceful stop (Stop); a second TERM or INT kills the workers
//	TTIN, TTOU one worker more, one fewer
//
// Upgrades requested while the first generation starts are queued. Run
// returns nil after a stop, or h.Start's error once whatever it started has
// been stopped.
func (m *Master) Run(h Hooks) error {
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM,
		syscall.SIGUSR2, syscall.SIGTTIN, syscall.SIGTTOU)
	defer signal.Stop(sigs)

	stopRequested := false
	stop := func(via string) {
		if stopRequested {
			return
		}
		stopRequested = true
		m.log.Info("stop requested", "via", via)
		if h.Stopping != nil {
			h.Stopping()
		}
		go m.Stop()
	}
	started := make(chan error, 1)
	starting := h.Start != nil
	if starting {
		go func() { started <- h.Start() }()
	}
	upgrade := func(k UpgradeKind) <-chan UpgradeOutcome {
		if h.Upgrade == nil {
			ch := make(chan UpgradeOutcome, 1)
			ch <- UpgradeOutcome{Kind: k.String(), Error: "upgrades are not configured"}
			return ch
		}
		return h.Upgrade(k)
	}
	stops := 0
	var queued []UpgradeKind
	for {
		select {
		case err := <-started:
			starting = false
			if err != nil {
				if stopRequested {
					<-m.stopped
					return nil
				}
				go m.Stop()
				<-m.stopped
				return err
			}
			m.mu.Lock()
			m.hooks = Hooks{Upgrade: h.Upgrade} // the control socket may upgrade now
			m.mu.Unlock()
			if h.Serving != nil && !stopRequested {
				h.Serving()
			}
			for _, k := range queued {
				if !stopRequested {
					upgrade(k)
				}
			}
			queued = nil
		case <-m.stopped:
			if starting {
				<-started
			}
			return nil
		case <-m.stopReq:
			stop("control")
		case s := <-sigs:
			sig := s.(syscall.Signal)
			name := unix.SignalName(sig)
			switch sig {
			case syscall.SIGHUP, syscall.SIGUSR2:
				kind := UpgradeAuto
				if sig == syscall.SIGUSR2 {
					kind = UpgradeMaster
				}
				switch {
				case stopRequested:
					m.log.Warn("upgrade ignored: the master is stopping", "signal", name)
				case starting:
					m.log.Info("upgrade queued until the first generation serves", "signal", name)
					queued = append(queued, kind)
				default:
					m.log.Info("upgrade requested", "signal", name, "kind", kind.String())
					upgrade(kind)
				}
			case syscall.SIGINT, syscall.SIGTERM:
				stops++
				if stops > 1 {
					m.log.Warn("second stop signal: killing workers now", "signal", name)
					m.Kill()
					continue
				}
				stop(name)
			case syscall.SIGTTIN, syscall.SIGTTOU:
				n := m.Size() + 1
				if sig == syscall.SIGTTOU {
					n = m.Size() - 1
				}
				if err := m.Scale(n); err != nil {
					m.log.Warn("scale refused", "signal", name, "error", err)
				}
			}
		}
	}
}

// notifyLocked wakes every waitFor. Called with m.mu held.
func (m *Master) notifyLocked() {
	close(m.changed)
	m.changed = make(chan struct{})
}

// waitFor re-evaluates cond (under m.mu) after every state change until it
// reports done, or ctx ends; then onTimeout (under m.mu, may be nil)
// decides the error.
func (m *Master) waitFor(ctx context.Context, cond func() (bool, error), onTimeout func() error) error {
	for {
		m.mu.Lock()
		done, err := cond()
		ch := m.changed
		m.mu.Unlock()
		if done {
			return err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			if onTimeout == nil {
				return ctx.Err()
			}
			m.mu.Lock()
			defer m.mu.Unlock()
			// The state may have settled in the meantime.
			if done, err := cond(); done {
				return err
			}
			return onTimeout()
		}
	}
}

// ScanInherited returns the descriptors at or above 3 that this process
// inherited and that are sockets. It marks every inherited descriptor
// (sockets and others) close-on-exec so none leaks into workers. Call it
// first thing in main, before anything else opens descriptors; skip lists
// descriptors that belong to someone else (tableflip's pipes).
func ScanInherited(skip ...int) []int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < 3 {
			continue
		}
		skipped := false
		for _, s := range skip {
			if s == fd {
				skipped = true
			}
		}
		if skipped {
			continue
		}
		var st unix.Stat_t
		if unix.Fstat(fd, &st) != nil {
			continue // the directory fd ReadDir used, now closed
		}
		unix.CloseOnExec(fd)
		if st.Mode&unix.S_IFMT == unix.S_IFSOCK {
			out = append(out, fd)
		}
	}
	return out
}

// ProcessRunning reports whether pid is a running process; a zombie (exited,
// not yet reaped) is not.
func ProcessRunning(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	st := string(b)
	i := strings.LastIndexByte(st, ')')
	return i < 0 || i+2 >= len(st) || st[i+2] != 'Z'
}
