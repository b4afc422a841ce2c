// Package notify owns the workers' sd_notify sockets: one datagram socket
// per worker (its NOTIFY_SOCKET), in the master's private runtime
// directory, and the reading of what arrives on it: READY=1, STATUS=,
// STOPPING=1.
//
// Invariants:
//   - Messages are attributed by socket, never by sender pid alone: a
//     worker's socket speaks for that worker only, and a sender must be the
//     worker or one of its descendants (SCM_CREDENTIALS). One worker cannot
//     mark another ready.
//   - Descriptors sent along (FDSTORE=) are closed at once.
//   - A socket is read at a bounded rate: a flood costs its sender, not the
//     master.
//   - Text that reaches the master's log or status is stripped of control
//     characters.
package notify

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gorolling/gorolling/handoff"
	"github.com/gorolling/gorolling/master/account"
	"github.com/gorolling/gorolling/master/control"
	"github.com/gorolling/gorolling/master/procfs"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// A socket is read at up to Rate datagrams a second after a burst of 100;
// a faster sender is read more slowly, so its datagrams queue in the kernel
// (and its sends block or fail) instead of costing the master.
const (
	Rate  = 50
	burst = 100
)

// maxStatusLen bounds the STATUS= text passed on.
const maxStatusLen = 256

// Handler receives what a worker says. Its methods are called from the
// goroutine that runs Serve, one at a time.
type Handler interface {
	// Ready: READY=1.
	Ready()
	// Status: STATUS=, already made printable.
	Status(text string)
	// Stopping: STOPPING=1, from sender.
	Stopping(sender int)
	// Throttled: the worker sends faster than Rate; called once per
	// socket.
	Throttled()
	// Ignored: a datagram was dropped, and why (for the log).
	Ignored(reason string, sender int)
	// Violation: the worker sent descriptors, which only a kernel
	// without SO_PASSRIGHTS lets through; Serve has stopped reading.
	Violation(reason string)
}

// Socket is one worker's NOTIFY_SOCKET.
type Socket struct {
	conn *net.UnixConn
	path string
	once sync.Once
}

// Open creates the notify socket of worker id in dir (which must be private
// to the master: the path is the master's to choose, and the file is
// replaced if one is left there). With owner set, the file is given to that
// account so its worker may send to it.
func Open(dir string, id int, owner *account.Account) (*Socket, error) {
	path := filepath.Join(dir, "notify-"+strconv.Itoa(id)+".sock")
	_ = os.Remove(path) // left by an earlier master using the same directory
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	s := &Socket{conn: c, path: path}
	rc, err := c.SyscallConn()
	if err == nil {
		var serr error
		err = rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
		})
		if err == nil {
			err = serr
		}
	}
	if err == nil {
		// Descriptors have no business here (FDSTORE= is not supported):
		// refuse them where the kernel can, discard them where not.
		_ = handoff.RefuseDescriptors(rc)
	}
	if err == nil && owner != nil {
		err = os.Lchown(path, int(owner.UID), int(owner.GID))
	}
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	return s, nil
}

// Path is the value of the worker's NOTIFY_SOCKET.
func (s *Socket) Path() string { return s.path }

// Close closes the socket and removes its file. It is idempotent, and a
// running Serve returns.
func (s *Socket) Close() {
	s.once.Do(func() {
		s.conn.Close()
		os.Remove(s.path)
	})
}

// Serve reads datagrams until the socket closes and tells h what worker
// pid said. Datagrams from processes outside the worker's tree, without
// credentials, or truncated are dropped.
func (s *Socket) Serve(pid int, h Handler) {
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred)+unix.CmsgSpace(4*16))
	lim := rate.NewLimiter(Rate, burst)
	throttled := false
	for {
		if d := lim.Reserve().Delay(); d > 0 {
			if !throttled {
				throttled = true
				h.Throttled()
			}
			time.Sleep(d)
		}
		n, oobn, flags, _, err := s.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		var cred *unix.Ucred
		sentFDs := false
		if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, cm := range msgs {
				if fds, err := unix.ParseUnixRights(&cm); err == nil {
					handoff.Discard(fds) // FDSTORE= is not supported
					sentFDs = true
				} else if c, err := unix.ParseUnixCredentials(&cm); err == nil {
					cred = c
				}
			}
		}
		if sentFDs {
			// Every descriptor costs a close, which can block: a sender of
			// many would exhaust the master's threads. It is stopped.
			h.Violation("sent descriptors on its notify socket")
			return
		}
		switch {
		case flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0:
			h.Ignored("truncated", -1)
		case cred == nil:
			h.Ignored("no credentials", -1)
		case !inTree(pid, int(cred.Pid)):
			h.Ignored("sender is not the worker or one of its descendants", int(cred.Pid))
		default:
			dispatch(string(buf[:n]), int(cred.Pid), h)
		}
	}
}

// inTree reports whether sender is worker or one of its descendants. A
// sender that has already exited (systemd-notify does, at once) cannot be
// checked and is accepted: the message came through this worker's own
// socket.
func inTree(worker, sender int) bool {
	if sender == worker {
		return true
	}
	for i := 0; i < 64 && sender > 1; i++ {
		st, err := procfs.ReadStat(sender)
		if err != nil {
			return i == 0 // the sender itself is gone
		}
		if st.PGrp == worker || st.PPid == worker {
			return true
		}
		sender = st.PPid
	}
	return false
}

// dispatch applies one sd_notify message: newline-separated KEY=VALUE
// assignments; unknown keys are ignored.
func dispatch(msg string, sender int, h Handler) {
	for _, line := range strings.Split(msg, "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		switch k {
		case "READY":
			if v == "1" {
				h.Ready()
			}
		case "STOPPING":
			if v == "1" {
				h.Stopping(sender)
			}
		case "STATUS":
			h.Status(control.Printable(v, maxStatusLen))
		}
	}
}
