package upgrade

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cloudflare/tableflip"
	"github.com/gorolling/gorolling/handoff"
	"github.com/gorolling/gorolling/master/control"
	"github.com/gorolling/gorolling/master/procfs"
	"github.com/gorolling/gorolling/master/registry"
	"github.com/gorolling/gorolling/master/sdnotify"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// stateFile is the name, in tableflip's fd inventory, of the socket that
// carries a master's state and sockets to its successor.
const stateFile = "gorolling-state"

// stateIdleTimeout bounds how long the state transfer may stall: a new
// master that reads nothing for that long fails the master upgrade.
const stateIdleTimeout = 10 * time.Second

// stateSndbufEnv, when set to a number of bytes, forces the state stream's
// send buffer that small: the tests use it to show that the transfer never
// depends on the socket buffer (net.core.wmem_max) being large.
const stateSndbufEnv = "GOROLLING_STATE_SNDBUF"

// SelfConfig configures Self.
type SelfConfig struct {
	// PIDFile, if set, always names the live master: tableflip rewrites it
	// atomically when a new master is ready.
	PIDFile string
	// UpgradeTimeout bounds how long a new master may take to be ready
	// (its own first generation included) before it is killed.
	UpgradeTimeout time.Duration
	// Logger receives events; nil means none.
	Logger hclog.Logger
}

// Self re-execs the master itself with cloudflare/tableflip: the new master
// starts from the gorolling binary on disk, receives the registry (every
// socket with its key, port-0 assignments, pre-opened and inherited
// sockets, unix socket ownership), the control socket and the service's
// counters, starts its own generation, and says ready; the old master then
// drains its own workers (only it can reap them) and exits. Only one Self
// may exist per process. A nil *Self is a master that cannot re-exec: its
// methods do nothing.
type Self struct {
	upg       *tableflip.Upgrader
	log       hclog.Logger
	exe       unix.Stat_t
	exeOK     bool
	parentPID int
	sd        *sdnotify.Notifier
	// pid1: this master is a container's init, whose exit ends the
	// container; it cannot hand over to a process with another pid.
	pid1     bool
	pid1Once sync.Once

	reg *registry.Registry // what a successor gets (Attach)
	ctl *control.Server

	serviceStarted time.Time
	masterUpgrades int
	masterRestarts int

	// rendezvous is the end of the state socketpair this master keeps; the
	// other end sits in tableflip's inventory for every successor. Made on
	// the first self-upgrade and reused by every later try, so a failed
	// try leaves nothing behind in the inventory. peer is this master's
	// own copy of the other end: what a failed successor never read is
	// queued there, and is discarded through it before the next try.
	rendezvous, peer *os.File

	mu         sync.Mutex
	parentGone bool
	goneCh     chan struct{} // closed once parentGone
	handedOver atomic.Bool   // MAINPID= named a successor
	workers    func() int    // the worker count a successor continues with

	store     *sdnotify.Store // systemd's fd store, nil if not kept
	storeWake func()          // asks for a store sync after an unsealing
}

// bundleState is the state a master hands to its successor besides the
// sockets. Its JSON is part of the self-upgrade protocol: a newer master
// reads what an older one wrote. The control socket travels in the same
// list as the registry's sockets, marked.
type bundleState struct {
	LastGeneration int       `json:"last_generation"`
	LastWorkerID   int       `json:"last_worker_id"`
	ServiceStarted time.Time `json:"service_started"`
	MasterUpgrades int       `json:"master_upgrades"`
	MasterRestarts int       `json:"master_restarts,omitempty"`
	// Workers is the worker count as the operator last set it (scale,
	// TTIN, TTOU); 0 from masters that did not send it.
	Workers int `json:"workers,omitempty"`
	// Stored is what systemd's fd store holds for the service, by this
	// master's account; the successor keeps the store from there.
	Stored  []sdnotify.Held      `json:"stored,omitempty"`
	Sockets []bundleSocket       `json:"sockets"`
	Ports   []registry.PortState `json:"ports"`
}

// bundleSocket is one socket of a bundle: the registry's description, or
// the control socket (Control).
type bundleSocket struct {
	registry.SocketState
	Control bool `json:"control,omitempty"`
}

// Inheritance is what a predecessor master handed over.
type Inheritance struct {
	// Registry and FDs are the sockets for registry.Restore.
	Registry registry.State
	FDs      []int
	// ControlFD is the control socket, or -1.
	ControlFD int
	// LastGeneration and LastWorkerID continue the numbering.
	LastGeneration, LastWorkerID int
	// Workers is the previous master's worker count, 0 if it did not say.
	Workers int
	// Stored is what the fd store holds (for sdnotify.Store.AssumeHeld).
	Stored []sdnotify.Held
}

// NewSelf creates the process's tableflip upgrader. Call it before
// anything else reads inherited descriptors: in a new master, tableflip's
// pipes sit on fds 3 and 4 and the inherited state after them.
func NewSelf(cfg SelfConfig) (*Self, error) {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	timeout := cfg.UpgradeTimeout
	if timeout <= 0 {
		timeout = tableflip.DefaultUpgradeTimeout
	}
	upg, err := tableflip.New(tableflip.Options{PIDFile: cfg.PIDFile, UpgradeTimeout: timeout})
	if err != nil {
		return nil, fmt.Errorf("upgrade: %w", err)
	}
	s := &Self{upg: upg, log: cfg.Logger, parentPID: os.Getppid(), serviceStarted: time.Now(),
		sd: sdnotify.FromEnv(), pid1: os.Getpid() == 1, goneCh: make(chan struct{})}
	if upg.HasParent() {
		// tableflip leaves its two pipes on fds 3 and 4 without
		// close-on-exec: every worker this master starts would inherit
		// them.
		unix.CloseOnExec(3)
		unix.CloseOnExec(4)
	}
	if unix.Stat("/proc/self/exe", &s.exe) == nil {
		s.exeOK = true
	}
	if !upg.HasParent() {
		s.setParentGone()
	}
	return s, nil
}

func (s *Self) setParentGone() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.parentGone {
		s.parentGone = true
		close(s.goneCh)
	}
}

// ParentGone is closed once no previous master runs any more (at once for
// a master that replaced none). From then on this master alone speaks for
// the service: systemd's fd store is its to keep.
func (s *Self) ParentGone() <-chan struct{} {
	if s == nil {
		ch := make(chan struct{})
		close(ch)
		return ch
	}
	return s.goneCh
}

// HandedOver reports whether this master has named its successor to
// systemd (MAINPID=): what it sends from then on is not believed.
func (s *Self) HandedOver() bool { return s != nil && s.handedOver.Load() }

// errPID1 refuses a master self-upgrade as pid 1.
var errPID1 = errors.New("gorolling runs as pid 1 (the container's init): a master self-upgrade starts a new master with another pid, and the old one's exit would end the container. HUP still rolls the workers; to run a new gorolling, restart the container from a new image")

// HasParent reports whether this master replaces a previous one.
func (s *Self) HasParent() bool { return s != nil && s.upg.HasParent() }

// Attach names what a successor gets: the registry's sockets and the
// control socket (which may be nil).
func (s *Self) Attach(reg *registry.Registry, ctl *control.Server) {
	if s != nil {
		s.reg, s.ctl = reg, ctl
	}
}

// AttachStore names the fd store a successor keeps after this master:
// while a self-upgrade runs, this master changes it no more (Seal), the
// successor learns what it holds, and if the upgrade fails, wake is
// called to bring the store up to date again.
func (s *Self) AttachStore(st *sdnotify.Store, wake func()) {
	if s != nil {
		s.store, s.storeWake = st, wake
	}
}

// Listen returns a listener that outlives self-upgrades: the first master
// binds it, and tableflip hands it to every successor, which gets the same
// socket for the same network and address (a port-0 address keeps the port
// it got). For the master's own endpoints, never for workers.
func (s *Self) Listen(network, addr string) (net.Listener, error) {
	return s.upg.Fds.Listen(network, addr)
}

// ServiceStarted is when the first master of this service started.
func (s *Self) ServiceStarted() time.Time {
	if s == nil {
		return time.Time{}
	}
	return s.serviceStarted
}

// MasterUpgrades counts the master upgrades since the service started.
func (s *Self) MasterUpgrades() int {
	if s == nil {
		return 0
	}
	return s.masterUpgrades
}

// MasterRestarts counts the times a master of this service died and a new
// one took its sockets back from systemd's fd store.
func (s *Self) MasterRestarts() int {
	if s == nil {
		return 0
	}
	return s.masterRestarts
}

// Resume continues the counters of a master that died: this one was
// started by the service manager with the sockets it kept.
func (s *Self) Resume(serviceStarted time.Time, masterUpgrades, masterRestarts int) {
	if s == nil {
		return
	}
	if !serviceStarted.IsZero() {
		s.serviceStarted = serviceStarted
	}
	s.masterUpgrades, s.masterRestarts = masterUpgrades, masterRestarts+1
}

// AttachWorkers names where the worker count a successor continues with
// comes from (the master's current size, after scale, TTIN or TTOU).
func (s *Self) AttachWorkers(workers func() int) {
	if s != nil {
		s.workers = workers
	}
}

// Inherited reads the state and sockets the previous master handed over,
// and tells it this master's pid. Only for a master with a parent.
func (s *Self) Inherited() (*Inheritance, error) {
	f, err := s.upg.Fds.File(stateFile)
	if err != nil {
		return nil, fmt.Errorf("upgrade: inherited state: %w", err)
	}
	if f == nil {
		return nil, errors.New("upgrade: the previous master passed no state")
	}
	defer f.Close()
	fd, err := rawFD(f)
	if err != nil {
		return nil, err
	}
	var st bundleState
	fds, reply, err := handoff.ReceiveBundle(fd, &st)
	if err != nil {
		return nil, fmt.Errorf("upgrade: inherited state: %w", err)
	}
	// Tell the old master who we are; it logs it and reports it.
	b, _ := json.Marshal(map[string]int{"pid": os.Getpid()})
	_ = handoff.Reply(reply, b)
	if reply != fd {
		unix.Close(reply)
	}
	in := &Inheritance{ControlFD: -1, LastGeneration: st.LastGeneration, LastWorkerID: st.LastWorkerID, Workers: st.Workers, Stored: st.Stored}
	for i, ss := range st.Sockets {
		if ss.Control {
			in.ControlFD = fds[i]
			continue
		}
		in.Registry.Sockets = append(in.Registry.Sockets, ss.SocketState)
		in.FDs = append(in.FDs, fds[i])
	}
	in.Registry.Ports = st.Ports
	s.serviceStarted, s.masterUpgrades, s.masterRestarts = st.ServiceStarted, st.MasterUpgrades+1, st.MasterRestarts
	return in, nil
}

// ready finishes a start: tableflip writes the PID file and releases the
// parent. A first master tells systemd READY=1. A successor says nothing:
// systemd (NotifyAccess=main) believes only the main process, so the old
// master announces its successor (MAINPID= and READY=1) once this one is
// ready.
func (s *Self) ready() error {
	if s == nil {
		return nil
	}
	if err := s.upg.Ready(); err != nil {
		return err
	}
	if !s.HasParent() {
		s.notify("READY=1\nSTATUS=serving")
		return nil
	}
	go func() {
		err := s.upg.WaitForParent(context.Background())
		s.setParentGone()
		if err != nil {
			s.log.Warn("previous master exited uncleanly", "pid", s.parentPID, "error", err)
		} else {
			s.log.Info("previous master exited", "pid", s.parentPID)
		}
	}()
	return nil
}

func (s *Self) pid() int { return os.Getpid() }

// waitingForParent reports whether the previous master is still draining.
func (s *Self) waitingForParent() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.parentGone
}

// binaryID identifies one version of a file on disk: replacing it
// (rename) changes the inode, rewriting it in place the size or mtime.
type binaryID struct {
	path             string
	dev, ino         uint64
	size             int64
	mtimeSec, mtimeN int64
}

// onDisk identifies the gorolling binary a self-upgrade would start now.
func (s *Self) onDisk() (binaryID, bool) {
	if s == nil {
		return binaryID{}, false
	}
	p, err := exec.LookPath(os.Args[0])
	if err != nil {
		return binaryID{}, false
	}
	var st unix.Stat_t
	if unix.Stat(p, &st) != nil {
		return binaryID{}, false
	}
	return binaryID{path: p, dev: st.Dev, ino: st.Ino, size: st.Size, mtimeSec: st.Mtim.Sec, mtimeN: st.Mtim.Nsec}, true
}

// binaryChanged reports whether the gorolling binary that a self-upgrade
// would start (os.Args[0], as tableflip resolves it) is another file than
// the one this master runs.
func (s *Self) binaryChanged() bool {
	if s == nil || !s.exeOK {
		return false
	}
	id, ok := s.onDisk()
	changed := ok && (id.dev != s.exe.Dev || id.ino != s.exe.Ino)
	if changed && s.pid1 {
		s.pid1Once.Do(func() {
			s.log.Warn("the gorolling binary changed on disk, but as pid 1 this master cannot replace itself; HUP upgrades the workers only (restart the container to run the new gorolling)")
		})
		return false
	}
	return changed
}

// upgrade starts a new master, streams it this master's state (with the
// counters lastGen and lastID) and waits until it is ready (its generation
// serves) or has failed. It returns the new master's pid. note reports
// what it waits for.
func (s *Self) upgrade(lastGen, lastID int, note func(string)) (pid int, err error) {
	if s.pid1 {
		return 0, errPID1
	}
	if s.store != nil {
		// Sockets stored after the export would be unknown to the
		// successor, which could never remove them: systemd would keep
		// their ports bound for the unit's life.
		defer func() {
			if err != nil {
				s.store.Unseal()
				if s.storeWake != nil {
					s.storeWake()
				}
			}
		}()
	}
	if s.waitingForParent() {
		if !procfs.Running(s.parentPID) {
			// It has exited; tableflip learns so from a pipe, a moment later.
			note(fmt.Sprintf("waiting for tableflip to see the previous master (pid %d) exit", s.parentPID))
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			if err := s.upg.WaitForParent(ctx); !errors.Is(err, context.DeadlineExceeded) {
				s.setParentGone()
			}
			cancel()
		}
		if s.waitingForParent() {
			return 0, fmt.Errorf("the previous master (pid %d) is still draining its workers; a new master can start once it has exited", s.parentPID)
		}
	}
	if s.rendezvous == nil {
		keep, give, err := handoff.Rendezvous()
		if err != nil {
			return 0, err
		}
		// tableflip keeps a duplicate for every successor; under the same
		// name it replaces what this master inherited.
		if err := s.upg.AddFile(stateFile, give); err != nil {
			keep.Close()
			give.Close()
			return 0, fmt.Errorf("upgrade: pass state: %w", err)
		}
		s.rendezvous, s.peer = keep, give
	}
	rz, err := rawFD(s.rendezvous)
	if err != nil {
		return 0, err
	}
	peer, err := rawFD(s.peer)
	if err != nil {
		return 0, err
	}
	// A stream a failed successor never took would hold the sockets in
	// flight, and the next successor would read it instead of its own.
	handoff.DiscardBundle(peer)
	defer func() {
		handoff.DiscardBundle(peer)
		// tableflip leaves the pipes of a failed child to the garbage
		// collector; collect them now rather than at some later GC.
		runtime.GC()
	}()
	sndbuf, _ := strconv.Atoi(os.Getenv(stateSndbufEnv))
	stream, err := handoff.OpenStream(rz, sndbuf)
	if err != nil {
		return 0, err
	}
	defer unix.Close(stream)
	st, fds, err := s.export(lastGen, lastID)
	if err != nil {
		return 0, err
	}
	if s.store != nil {
		st.Stored = s.store.Seal()
	}
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()

	// Start the new master first, then stream the state while it reads: a
	// bundle queued before it runs could fill the socket buffer and block
	// this master (and every later upgrade, and the stop) for good.
	note("starting a new master")
	upgraded := make(chan error, 1)
	go func() { upgraded <- s.upg.Upgrade() }()
	abort := make(chan struct{})
	streamed := make(chan error, 1)
	go func() { streamed <- handoff.SendBundle(stream, st, fds, stateIdleTimeout, abort) }()
	var upErr, sendErr error
	select {
	case sendErr = <-streamed:
		if sendErr != nil {
			// Close the stream so a new master that waits for the rest
			// sees its end at once, fails and exits.
			unix.Shutdown(stream, unix.SHUT_RDWR)
		}
		upErr = <-upgraded
	case upErr = <-upgraded:
		close(abort)
		sendErr = <-streamed
	}
	if upErr != nil {
		if sendErr != nil {
			return 0, fmt.Errorf("the new master did not take the state: %v", sendErr)
		}
		return 0, explainTableflip(upErr)
	}
	var r map[string]int
	if json.Unmarshal(handoff.ReadReply(stream), &r) == nil {
		pid = r["pid"]
	}
	return pid, nil
}

// export collects what a successor gets, with duplicates of the sockets'
// descriptors, which the caller closes.
func (s *Self) export(lastGen, lastID int) (bundleState, []int, error) {
	st := bundleState{LastGeneration: lastGen, LastWorkerID: lastID, ServiceStarted: s.serviceStarted,
		MasterUpgrades: s.masterUpgrades, MasterRestarts: s.masterRestarts}
	if s.workers != nil {
		st.Workers = s.workers()
	}
	if s.reg == nil {
		return st, nil, errors.New("upgrade: nothing to hand over (no registry attached)")
	}
	rs, fds, err := s.reg.Export()
	if err != nil {
		return st, nil, err
	}
	for _, ss := range rs.Sockets {
		st.Sockets = append(st.Sockets, bundleSocket{SocketState: ss})
	}
	st.Ports = rs.Ports
	if s.ctl != nil {
		d, err := s.ctl.Dup()
		if err != nil {
			for _, fd := range fds {
				unix.Close(fd)
			}
			return st, nil, fmt.Errorf("upgrade: pass the control socket: %w", err)
		}
		p := s.ctl.Path()
		st.Sockets = append(st.Sockets, bundleSocket{SocketState: registry.SocketState{Network: "unix", Addr: p, Path: p, PreopenIndex: -1}, Control: true})
		fds = append(fds, d)
	}
	return st, fds, nil
}

func rawFD(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := rc.Control(func(x uintptr) { fd = int(x) }); err != nil {
		return -1, err
	}
	return fd, nil
}

// explainTableflip turns tableflip's terse errors into ones an operator
// can act on.
func explainTableflip(err error) error {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "exited"):
		return fmt.Errorf("the new master exited before it was ready (%v); see its log lines above", err)
	case strings.Contains(msg, "timed out"):
		return fmt.Errorf("the new master was not ready in time and was killed (%v)", err)
	case strings.Contains(msg, "can't start"):
		return fmt.Errorf("the new master could not be started (%v)", err)
	}
	return err
}

// Notify sends state (e.g. "STOPPING=1") to systemd's notify socket, if the
// master was started with one. Problems are logged, never returned.
func (s *Self) Notify(state string) { s.notify(state) }

func (s *Self) notify(state string) {
	if s == nil {
		return
	}
	if err := s.sd.Notify(state); err != nil {
		s.log.Warn("sd_notify failed", "error", err)
	}
}

// handOver names the successor pid to systemd as the service's main
// process; this master's later messages would not be believed.
func (s *Self) handOver(pid int) {
	if s == nil {
		return
	}
	s.handedOver.Store(true)
	s.notify(fmt.Sprintf("MAINPID=%d\nREADY=1\nSTATUS=serving", pid))
}
