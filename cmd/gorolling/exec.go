package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/master"
	"github.com/gorolling/gorolling/master/account"
	"github.com/gorolling/gorolling/master/control"
	"github.com/gorolling/gorolling/master/events"
	"github.com/gorolling/gorolling/master/metrics"
	"github.com/gorolling/gorolling/master/placement"
	"github.com/gorolling/gorolling/master/registry"
	"github.com/gorolling/gorolling/master/sdnotify"
	"github.com/gorolling/gorolling/upgrade"
	"github.com/hashicorp/go-hclog"
	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"
)

// execOptions are the flags of "gorolling exec".
type execOptions struct {
	workers      int
	readyTimeout time.Duration
	drainTimeout time.Duration
	stopSignal   string
	pidFile      string
	logLevel     string
	logFormat    string
	listen       []string
	ready        string
	nofile       uint64
	name         string
	control      string
	user         string
	group        string
	reuseport    bool
	spread       string
	maxSockets   int
	fdStore      string
	chdir        string
	metrics      string
	logPrefix    bool
}

// execFlags defines the flags of "gorolling exec". The man page is
// generated from the same definitions.
func execFlags() (*pflag.FlagSet, *execOptions) {
	o := &execOptions{}
	fs := pflag.NewFlagSet("exec", pflag.ContinueOnError)
	fs.SetInterspersed(false) // everything after PROGRAM belongs to it
	fs.IntVarP(&o.workers, "workers", "w", 0, "number of worker processes per generation (default: the number of CPUs)")
	fs.DurationVar(&o.readyTimeout, "ready-timeout", 30*time.Second, "how long a new generation may take to become ready before the upgrade is rolled back")
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 30*time.Second, "how long a draining worker may take to exit before it is killed")
	fs.StringVar(&o.stopSignal, "stop-signal", "TERM", "signal sent to workers to make them drain (after the drain message)")
	fs.StringVar(&o.pidFile, "pid-file", "", "write the master's pid to this file")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: trace, debug, info, warn or error")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fs.StringArrayVar(&o.listen, "listen", nil, "pre-open a listener and pass it to every worker as LISTEN_FDS (repeatable): tcp://HOST:PORT, tcp6://[::1]:PORT, udp://HOST:PORT, unix:///PATH?mode=0660, fd://N or fd://NAME, each with an optional ?name=NAME for LISTEN_FDNAMES")
	fs.StringVar(&o.ready, "ready", "auto", "when a worker counts as ready: auto (the first of worker.Ready() and sd_notify READY=1) or timer:DURATION (that long after it started, for programs that can signal nothing)")
	fs.Uint64Var(&o.nofile, "nofile", 0, "open-file limit (RLIMIT_NOFILE) for the master and its workers; 0 means the hard limit")
	fs.StringVar(&o.name, "name", "", "the service's name, for the default control socket "+control.DefaultDir()+"/NAME.sock (default: the program's file name)")
	fs.StringVar(&o.spread, "spread", "even", "how new TCP connections reach a generation's workers (for the sockets workers ask for; --listen sockets stay shared): even (each slot has its own SO_REUSEPORT socket and the master's BPF program deals connections round-robin to the slots whose worker is ready; the kernel's hash where BPF is refused), hash (the same sockets, the kernel's hash decides) or shared (one socket that every worker accepts from, Node's cluster semantics; the busiest worker may win most)")
	fs.BoolVar(&o.reuseport, "reuseport", false, "the same as --spread hash (kept for older configurations)")
	fs.StringVar(&o.user, "user", "", "run the workers as this user (name or uid), with its supplementary groups; the master keeps its privileges to bind --listen sockets")
	fs.StringVar(&o.group, "group", "", "with --user: run the workers with this primary group (name or gid) instead of the user's")
	fs.IntVar(&o.maxSockets, "max-sockets", 1024, "the most sockets the master opens on workers' requests; past it a worker's listen fails with ENFILE (--listen and inherited sockets do not count against it)")
	fs.StringVar(&o.fdStore, "fd-store", "auto", "keep every socket in systemd's file descriptor store, so that a master that dies and is restarted refuses no connection: on (needs FileDescriptorStoreMax= in the unit), off, or auto (on when systemd announces a store in $FDSTORE, systemd 254 and later)")
	fs.StringVar(&o.chdir, "chdir", "", "the workers' working directory, resolved through its symlinks at every new generation, so that a symlink in it switched to a new release (/srv/app/current) takes effect at the next HUP while the running generation keeps its release; a relative PROGRAM with a '/' is found in it too (default: the master's working directory at start)")
	fs.BoolVar(&o.logPrefix, "worker-log-prefix", false, "relay every line the workers write through the master, prefixed with [gen N slot S pid P] (with --log-format json: as JSON records with those fields); off, workers write to the master's stdout and stderr themselves, which a master crash cannot break")
	fs.StringVar(&o.metrics, "metrics", "", "serve Prometheus metrics at http://ADDR/metrics (HOST:PORT; off by default); the socket passes to the next master at a self-upgrade")
	fs.StringVar(&o.control, "control", "", "the control socket's path (overrides --name; \"none\" for no control socket)")
	return fs, o
}

const execLong = `Starts a master that runs --workers copies of PROGRAM. Workers ask the master
for listening sockets (Go programs through the worker package); the master
opens each once and gives every worker a duplicate, so all workers accept on
the same sockets. SIGHUP starts a new generation from PROGRAM as it is on disk
now, waits until every new worker is ready, then drains the old generation; a
new worker that exits or is not ready within --ready-timeout rolls the upgrade
back. TERM or INT drains everything and exits 0.

The exit status is 0 after a clean stop; 1 when the master cannot start
(program not found or not executable, every worker exits before it is ready,
none ready in time, a --listen socket or the --chdir directory that cannot be
used, a control socket in use or a control directory that is not private);
2 for bad usage.`

func parseSignal(s string) (syscall.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 64 {
			return 0, fmt.Errorf("signal number %d out of range", n)
		}
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("unknown signal %q", s)
}

func newLogger(level, format string, out io.Writer) (hclog.Logger, error) {
	lvl := hclog.LevelFromString(level)
	if lvl == hclog.NoLevel {
		return nil, fmt.Errorf("unknown log level %q (want trace, debug, info, warn or error)", level)
	}
	var json bool
	switch format {
	case "text":
	case "json":
		json = true
	default:
		return nil, fmt.Errorf("unknown log format %q (want text or json)", format)
	}
	return hclog.New(&hclog.LoggerOptions{
		Name:       "gorolling",
		Level:      lvl,
		JSONFormat: json,
		Output:     out,
		TimeFormat: "2006-01-02T15:04:05.000Z07:00",
	}), nil
}

func runExec(args []string, stdout, stderr io.Writer) int {
	fs, o := execFlags()
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			commandUsage(stdout, findCommand("exec"))
			return 0
		}
		fmt.Fprintf(stderr, "gorolling exec: %v\nRun 'gorolling help exec' for usage.\n", err)
		return 2
	}
	if fs.NArg() == 0 {
		fmt.Fprintf(stderr, "gorolling exec: no program given\nRun 'gorolling help exec' for usage.\n")
		return 2
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "gorolling exec: "+format+"\n", a...)
		return 2
	}
	if !fs.Changed("workers") {
		o.workers = runtime.NumCPU()
	}
	if o.workers < 1 {
		return fail("--workers must be at least 1, got %d", o.workers)
	}
	if o.readyTimeout <= 0 {
		return fail("--ready-timeout must be positive, got %s", o.readyTimeout)
	}
	if o.drainTimeout <= 0 {
		return fail("--drain-timeout must be positive, got %s", o.drainTimeout)
	}
	if o.reuseport {
		if fs.Changed("spread") && o.spread != "hash" {
			return fail("--reuseport means --spread hash; it cannot be used with --spread %s", o.spread)
		}
		o.spread = "hash"
	}
	switch o.spread {
	case "even", "hash", "shared":
	default:
		return fail("--spread must be even, hash or shared, got %q", o.spread)
	}
	if o.maxSockets < 1 || o.maxSockets > maxSocketsLimit {
		return fail("--max-sockets must be 1 to %d, got %d", maxSocketsLimit, o.maxSockets)
	}
	if o.chdir != "" {
		abs, err := filepath.Abs(o.chdir) // symlinks stay: each generation resolves them anew
		if err != nil {
			return fail("--chdir %q: %v", o.chdir, err)
		}
		if fi, err := os.Stat(abs); err != nil {
			fmt.Fprintf(stderr, "gorolling exec: --chdir: %v\n", err)
			return 1
		} else if !fi.IsDir() {
			fmt.Fprintf(stderr, "gorolling exec: --chdir %q: not a directory\n", o.chdir)
			return 1
		}
		o.chdir = abs
	}
	if o.metrics != "" {
		if _, _, err := net.SplitHostPort(o.metrics); err != nil {
			return fail("--metrics %q: want HOST:PORT: %v", o.metrics, err)
		}
	}
	switch o.fdStore {
	case "auto", "on", "off":
	default:
		return fail("--fd-store %q: want auto, on or off", o.fdStore)
	}
	stopSig, err := parseSignal(o.stopSignal)
	if err != nil {
		return fail("--stop-signal: %v", err)
	}
	var specs []registry.ListenSpec
	for _, l := range o.listen {
		ls, err := registry.ParseListenSpec(l)
		if err != nil {
			return fail("%v", err)
		}
		specs = append(specs, ls)
	}
	var readyTimer time.Duration
	readyHint := ""
	switch {
	case o.ready == "auto":
		readyHint = "if the program cannot signal readiness (worker.Ready, or sd_notify READY=1 to $NOTIFY_SOCKET), use --ready=timer:DURATION"
	case strings.HasPrefix(o.ready, "timer:"):
		d, err := time.ParseDuration(strings.TrimPrefix(o.ready, "timer:"))
		if err != nil || d <= 0 {
			return fail("--ready %q: want timer:DURATION with a positive duration, e.g. timer:2s", o.ready)
		}
		if d >= o.readyTimeout {
			return fail("--ready %q: the timer must be shorter than --ready-timeout (%s)", o.ready, o.readyTimeout)
		}
		readyTimer = d
	default:
		return fail("--ready %q: want auto or timer:DURATION", o.ready)
	}
	if err := setNofile(o.nofile); err != nil {
		return fail("--nofile: %v", err)
	}
	root, err := newLogger(o.logLevel, o.logFormat, stderr)
	if err != nil {
		return fail("%v", err)
	}
	var acct *account.Account
	if o.user != "" {
		if acct, err = account.Lookup(o.user, o.group); err != nil {
			return fail("%v", err)
		}
	} else if o.group != "" {
		return fail("--group needs --user")
	}
	ctlPath, err := controlPath(o.control, o.name, fs.Arg(0))
	if err != nil {
		return fail("%v", err)
	}
	pidFile := o.pidFile
	if pidFile != "" {
		if pidFile, err = filepath.Abs(pidFile); err != nil {
			return fail("--pid-file: %v", err)
		}
	}
	d := &daemon{
		log:       root.Named("master"),
		program:   fs.Arg(0),
		version:   Version(),
		started:   time.Now(),
		stopReq:   make(chan struct{}),
		storeWake: make(chan struct{}, 1),
	}
	startFailed := func(err error) int {
		d.log.Error("cannot start", "error", err)
		fmt.Fprintf(stderr, "gorolling: %v\n", err)
		return 1
	}
	if d.self, err = upgrade.NewSelf(upgrade.SelfConfig{
		PIDFile:        pidFile,
		UpgradeTimeout: o.readyTimeout + 15*time.Second,
		Logger:         root.Named("upgrade"),
	}); err != nil {
		return startFailed(err)
	}
	if sd := sdnotify.FromEnv(); sd != nil && (o.fdStore == "on" || (o.fdStore == "auto" && sdnotify.StoreMax() > 0)) {
		d.store, _ = sdnotify.NewStore(sd, sdnotify.StoreMax())
	} else if o.fdStore == "on" {
		d.log.Warn("--fd-store on: there is no service manager ($NOTIFY_SOCKET is not set); the sockets are not kept across a master's death")
	}
	var predecessor int
	if d.self.HasParent() {
		predecessor = os.Getppid()
	}
	if d.watchdog, err = sdnotify.Watchdog(predecessor); err != nil {
		d.log.Warn("systemd's watchdog settings are unusable; not serving the watchdog", "error", err)
	}
	regOpt := registry.Options{Owner: acct, ReusePort: o.spread != "shared", Max: o.maxSockets}
	if d.store != nil {
		regOpt.Changed = d.wakeStore
	}
	workers, workersFrom := o.workers, ""
	var lastGen, lastID int
	if d.self.HasParent() {
		in, err := d.self.Inherited()
		if err != nil {
			return startFailed(fmt.Errorf("take over from the previous master: %w", err))
		}
		if d.reg, err = registry.Restore(regOpt, in.Registry, in.FDs); err != nil {
			return startFailed(err)
		}
		d.log.Info("state taken over from the previous master", "sockets", len(in.FDs), "last_generation", in.LastGeneration, "workers", in.Workers)
		lastGen, lastID = in.LastGeneration, in.LastWorkerID
		if d.store != nil {
			// The predecessor's entries are this master's to keep (and
			// to remove) once the predecessor has gone.
			d.store.AssumeHeld(in.Stored)
		}
		if in.Workers > 0 && in.Workers <= master.MaxWorkers {
			workers, workersFrom = in.Workers, "the previous master"
		}
		if in.ControlFD >= 0 {
			if ctlPath == "" {
				unix.Close(in.ControlFD)
			} else if d.ctl, err = control.FromFD(in.ControlFD, ctlPath, root.Named("master.control")); err != nil {
				d.log.Warn("inherited control socket unusable; binding a new one", "error", err)
			}
		}
	} else {
		d.reg = registry.New(regOpt)
		saved, stored, err := d.takeInherited()
		if err != nil {
			d.reg.Close(true)
			return startFailed(err)
		}
		if saved != nil || stored > 0 {
			// systemd restarted this service's master, which died: go on
			// where it left off.
			if saved != nil {
				lastGen, lastID = saved.LastGeneration, saved.LastWorkerID
				d.self.Resume(saved.ServiceStarted, saved.MasterUpgrades, saved.MasterRestarts)
				// Out of range, it cannot be ours: a master that cannot
				// start would never get past it.
				if saved.Workers > 0 && saved.Workers <= master.MaxWorkers {
					workers, workersFrom = saved.Workers, "the master that died"
				}
			}
			d.log.Warn("the previous master died; serving again with the sockets systemd's fd store kept", events.Key, events.MasterRestarted, "sockets", stored, "last_generation", lastGen, "master_restarts", d.self.MasterRestarts())
		}
		for _, s := range d.reg.ReleaseUnlisted(specs) {
			d.log.Info("a --listen socket the fd store kept is no longer listed; closed", events.Key, events.ListenerClosed, "key", s.Key.String(), "addr", s.Addr)
		}
		for _, ls := range specs {
			s, err := d.reg.Preopen(ls)
			if err != nil {
				d.reg.Close(true)
				return startFailed(err)
			}
			d.log.Info("listener pre-opened", events.Key, events.ListenerPreopened, "spec", ls.Spec, "addr", s.Addr, "network", s.Network, "name", s.Name, "fd", 2+len(d.reg.Preopened()))
		}
		for _, s := range d.reg.ReleaseUnclaimed() {
			d.log.Info("a --listen socket the fd store kept is no longer listed; closed", events.Key, events.ListenerClosed, "key", s.Key.String(), "addr", s.Addr)
		}
	}
	if workers != o.workers {
		d.log.Info("continuing with the worker count set at run time (scale, TTIN, TTOU); --workers applies to a fresh start", "workers", workers, "from", workersFrom, "flag", o.workers)
	}
	if d.watchdog > 0 {
		d.log.Info("serving systemd's watchdog", events.Key, events.WatchdogEnabled, "timeout", d.watchdog)
	}
	pid1 := os.Getpid() == 1
	if pid1 {
		d.log.Info("running as pid 1 (a container's init): reaping orphans; TERM and INT stop gracefully; master self-upgrades are refused")
	}
	if ctlPath != "" && d.ctl == nil {
		if d.ctl, err = control.Listen(ctlPath, root.Named("master.control")); err != nil {
			d.reg.Close(!d.self.HasParent())
			return startFailed(err)
		}
	}
	var placer *placement.Placer
	switch o.spread {
	case "hash":
		warnMigrate(d.log)
	case "even":
		placer = placement.New()
		defer placer.Close()
	}
	d.m, err = master.New(master.Config{
		Program:        d.program,
		Args:           fs.Args()[1:],
		Workers:        workers,
		DrainTimeout:   o.drainTimeout,
		StopSignal:     stopSig,
		Logger:         d.log,
		Registry:       d.reg,
		Placer:         placer,
		Shim:           []string{shimPath, shimCommand},
		ReadyTimer:     readyTimer,
		Account:        acct,
		LastGeneration: lastGen,
		LastWorkerID:   lastID,
		ReapOrphans:    pid1,
		Changed:        d.wakeStore,
		Dir:            o.chdir,
		Output:         workerOutput(o),
	})
	if err != nil {
		d.close(!d.self.HasParent())
		return startFailed(err)
	}
	if pidFile != "" {
		defer removePIDFile(pidFile)
	}
	d.self.Attach(d.reg, d.ctl)
	d.self.AttachWorkers(d.m.Size)
	if d.store != nil {
		d.self.AttachStore(d.store, d.wakeStore)
	}
	cfg := upgrade.Config{
		ReadyTimeout: o.readyTimeout,
		ReadyHint:    readyHint,
		Logger:       root.Named("upgrade"),
		Self:         d.self,
	}
	if o.metrics != "" {
		d.metrics = metrics.New(d.Status, d.version)
		cfg.Finished = d.metrics.UpgradeFinished
	}
	d.mgr = upgrade.New(d.m, cfg)
	if o.metrics != "" {
		if d.metricsL, err = d.self.Listen("tcp", o.metrics); err != nil {
			d.close(!d.self.HasParent())
			return startFailed(fmt.Errorf("--metrics %s: %w", o.metrics, err))
		}
		d.log.Info("serving metrics", events.Key, events.MetricsServing, "addr", d.metricsL.Addr().String())
	}
	d.log.Info("master starting", events.Key, events.MasterStarting, "pid", os.Getpid(), "version", d.version, "program", d.program, "workers", workers, "control", ctlPath, "successor", d.self.HasParent())
	if err := d.run(); err != nil {
		d.log.Error("first generation failed", "error", err)
		fmt.Fprintf(stderr, "gorolling: cannot start %s: %v\n", d.program, err)
		return 1
	}
	return 0
}

// warnMigrate says, with --spread hash, whether the kernel moves the
// connections queued on a member socket that closes (scale-down) to the
// others, or resets them.
func warnMigrate(log hclog.Logger) {
	b, _ := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
	if v := strings.TrimSpace(string(b)); v == "1" {
		log.Info("--spread hash", "tcp_migrate_req", v)
	} else {
		log.Warn("--spread hash: net.ipv4.tcp_migrate_req is not 1, so connections queued on a slot's socket are reset when scaling down removes the slot (upgrades keep every socket)", "tcp_migrate_req", v)
	}
}

// maxSocketsLimit bounds --max-sockets: what one self-upgrade bundle
// carries, with room for the --listen, inherited and control sockets.
const maxSocketsLimit = 60000

// controlPath picks the control socket: --control, else --name, else the
// program's file name, in the default directory. "none" disables it.
func controlPath(flag, name, program string) (string, error) {
	if flag == "none" {
		return "", nil
	}
	if flag != "" {
		return filepath.Abs(flag)
	}
	if name == "" {
		name = filepath.Base(program)
	}
	if name == "" || name == "." || strings.ContainsAny(name, "/\x00") {
		return "", fmt.Errorf("--name %q: want a plain name (no '/')", name)
	}
	return control.DefaultPath(name), nil
}

// removePIDFile removes the pid file if it still names this process.
func removePIDFile(path string) {
	b, err := os.ReadFile(path)
	if err == nil && strings.TrimSpace(string(b)) == strconv.Itoa(os.Getpid()) {
		os.Remove(path)
	}
}

// setNofile sets the open-file limit the workers inherit. Go raises its own
// soft limit to the hard limit at start but gives children the original
// (often 1024) back, unless the process sets the limit itself: setting it
// here, even to the raised value, makes the workers inherit it, so non-Go
// workers do not hit EMFILE under load. 0 means the hard limit.
func setNofile(n uint64) error {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return err
	}
	if n == 0 {
		n = rl.Max
	}
	if n > rl.Max {
		return fmt.Errorf("%d is above the hard limit %d", n, rl.Max)
	}
	rl.Cur = n
	return syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
}

// shimPath is the binary the workers' shim runs from: this master's own
// executable, through /proc/self/exe, which the forked child resolves to
// the master's inode even once the file on disk was replaced (a broken
// package must not break the respawns and the fallback upgrade of a
// master that still runs). A child that has switched to another account
// may follow it too: a process may always look at its own /proc entries.
const shimPath = "/proc/self/exe"

// workerOutput says how the workers' output reaches the master's stdout
// and stderr.
func workerOutput(o *execOptions) master.Output {
	switch {
	case !o.logPrefix && o.user != "" && (isTerminal(1) || isTerminal(2)):
		// Workers of another account never get the operator's terminal.
		return master.OutputRelayed
	case !o.logPrefix:
		return master.OutputDirect
	case o.logFormat == "json":
		return master.OutputJSON
	}
	return master.OutputPrefixed
}

// isTerminal reports whether descriptor fd is a terminal.
func isTerminal(fd int) bool {
	_, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	return err == nil
}
