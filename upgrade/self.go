package upgrade

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
	"github.com/gorolling/gorolling/handoff"
	"github.com/gorolling/gorolling/master"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// stateFile is the name, in tableflip's fd inventory, of the socket that
// carries a master's state and sockets to its successor.
const stateFile = "gorolling-state"

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
// socket with its key, port-0 assignments, pre-opened and inherited sockets,
// unix socket ownership) over a private socketpair, starts its own
// generation, and says ready; the old master then drains its own workers
// (only it can reap them) and exits. Only one Self may exist per process.
type Self struct {
	upg       *tableflip.Upgrader
	log       hclog.Logger
	notify    string // systemd's NOTIFY_SOCKET, kept for the whole life
	exe       unix.Stat_t
	exeOK     bool
	parentPID int

	mu         sync.Mutex
	parentGone bool
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
	s := &Self{upg: upg, log: cfg.Logger, notify: os.Getenv("NOTIFY_SOCKET"), parentPID: os.Getppid()}
	if unix.Stat("/proc/self/exe", &s.exe) == nil {
		s.exeOK = true
	}
	if !upg.HasParent() {
		s.parentGone = true
	}
	return s, nil
}

// HasParent reports whether this master replaces a previous one.
func (s *Self) HasParent() bool { return s.upg.HasParent() }

// Inherited reads the state and sockets the previous master handed over,
// and tells it this master's pid. Only for a master with a parent.
func (s *Self) Inherited() (*master.Restore, error) {
	f, err := s.upg.Fds.File(stateFile)
	if err != nil {
		return nil, fmt.Errorf("upgrade: inherited state: %w", err)
	}
	if f == nil {
		return nil, errors.New("upgrade: the previous master passed no state")
	}
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var rs master.Restore
	var rerr error
	if err := rc.Control(func(fd uintptr) {
		rs.FDs, rerr = handoff.ReceiveBundle(int(fd), &rs.State)
		if rerr == nil {
			// Tell the old master who we are; it logs it and reports it.
			b, _ := json.Marshal(map[string]int{"pid": os.Getpid()})
			_ = unix.Sendmsg(int(fd), b, nil, nil, unix.MSG_DONTWAIT)
		}
	}); err != nil {
		return nil, err
	}
	if rerr != nil {
		return nil, fmt.Errorf("upgrade: inherited state: %w", rerr)
	}
	return &rs, nil
}

// ready finishes a start: tableflip writes the PID file and releases the
// parent; systemd hears MAINPID and READY=1.
func (s *Self) ready() error {
	if err := s.upg.Ready(); err != nil {
		return err
	}
	state := "READY=1\nSTATUS=serving"
	if s.HasParent() {
		state = "MAINPID=" + strconv.Itoa(os.Getpid()) + "\n" + state
		go func() {
			err := s.upg.WaitForParent(context.Background())
			s.mu.Lock()
			s.parentGone = true
			s.mu.Unlock()
			if err != nil {
				s.log.Warn("previous master exited uncleanly", "pid", s.parentPID, "error", err)
			} else {
				s.log.Info("previous master exited", "pid", s.parentPID)
			}
		}()
	}
	s.sdNotify(state)
	return nil
}

// waitingForParent reports whether the previous master is still draining.
func (s *Self) waitingForParent() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.parentGone
}

// BinaryChanged reports whether the gorolling binary that a self-upgrade
// would start (os.Args[0], as tableflip resolves it) is another file than
// the one this master runs.
func (s *Self) BinaryChanged() bool {
	if !s.exeOK {
		return false
	}
	p, err := exec.LookPath(os.Args[0])
	if err != nil {
		return false
	}
	var st unix.Stat_t
	if unix.Stat(p, &st) != nil {
		return false
	}
	return st.Dev != s.exe.Dev || st.Ino != s.exe.Ino
}

// upgrade starts a new master with m's state and waits until it is ready
// (its generation serves) or has failed. It returns the new master's pid.
func (s *Self) upgrade(m *master.Master) (int, error) {
	if s.waitingForParent() {
		if !master.ProcessRunning(s.parentPID) {
			// It has exited; tableflip learns so from a pipe, a moment later.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			if err := s.upg.WaitForParent(ctx); !errors.Is(err, context.DeadlineExceeded) {
				s.mu.Lock()
				s.parentGone = true
				s.mu.Unlock()
			}
			cancel()
		}
		if s.waitingForParent() {
			return 0, fmt.Errorf("the previous master (pid %d) is still draining its workers; a new master can start once it has exited", s.parentPID)
		}
	}
	send, recv, err := handoff.BundlePair()
	if err != nil {
		return 0, err
	}
	defer send.Close()
	defer recv.Close()
	st, fds := m.ExportState()
	sendFD, err := rawFD(send)
	if err != nil {
		return 0, err
	}
	if err := handoff.SendBundle(sendFD, st, fds); err != nil {
		return 0, err
	}
	recvFD, err := rawFD(recv)
	if err != nil {
		return 0, err
	}
	if err := s.upg.AddFile(stateFile, recv); err != nil {
		handoff.DiscardBundle(recvFD)
		return 0, fmt.Errorf("upgrade: pass state: %w", err)
	}
	if err := s.upg.Upgrade(); err != nil {
		// Release the sockets still queued for a master that never took
		// them (tableflip keeps a duplicate of this end).
		handoff.DiscardBundle(recvFD)
		return 0, explainTableflip(err)
	}
	pid := 0
	buf := make([]byte, 128)
	if n, _, err := unix.Recvfrom(sendFD, buf, unix.MSG_DONTWAIT); err == nil && n > 0 {
		var r map[string]int
		if json.Unmarshal(buf[:n], &r) == nil {
			pid = r["pid"]
		}
	}
	return pid, nil
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
// master was started with one. It never fails: problems are logged.
func (s *Self) Notify(state string) { s.sdNotify(state) }

// sdNotify sends state to systemd's notify socket, if the master has one.
func (s *Self) sdNotify(state string) {
	if s == nil || s.notify == "" {
		return
	}
	path := s.notify
	if strings.HasPrefix(path, "@") {
		path = "\x00" + path[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		s.log.Warn("sd_notify failed", "error", err)
		return
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil && !errors.Is(err, syscall.ECONNREFUSED) {
		s.log.Warn("sd_notify failed", "error", err)
	}
}
