// Package sdnotify is the master's side of systemd's service notification
// protocol ($NOTIFY_SOCKET): state lines (READY=1, MAINPID=, STOPPING=1),
// the file descriptor store (FDSTORE=1) that keeps the master's sockets
// open while systemd restarts a master that died, and the watchdog
// (WATCHDOG=1). It knows nothing of what the descriptors are: callers name
// them.
//
// Plain state lines go through go-systemd's daemon package. Descriptors
// cannot: it has no call that attaches them, so Send writes the datagram
// itself, one sendmsg with SCM_RIGHTS, which is all the protocol is.
package sdnotify

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// Notifier sends to the service manager's notify socket. A nil *Notifier
// is a process without one: its methods do nothing.
type Notifier struct {
	addr string
}

// FromEnv returns a Notifier for $NOTIFY_SOCKET, or nil if it is not set.
// The variable stays in the environment: a successor master started from
// this one must inherit it to speak to systemd in turn.
func FromEnv() *Notifier {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return nil
	}
	return &Notifier{addr: addr}
}

// Notify sends state, one or more NAME=VALUE lines.
func (n *Notifier) Notify(state string) error {
	if n == nil {
		return nil
	}
	_, err := daemon.SdNotify(false, state)
	return err
}

// Send sends state with the descriptors fds attached (SCM_RIGHTS). The
// receiver gets duplicates; the caller keeps its own.
func (n *Notifier) Send(state string, fds []int) error {
	if n == nil {
		return nil
	}
	if len(fds) == 0 {
		return n.Notify(state)
	}
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer unix.Close(s)
	// A leading '@' names the abstract namespace; x/sys maps it.
	to := &unix.SockaddrUnix{Name: n.addr}
	if err := unix.Sendmsg(s, []byte(state), unix.UnixRights(fds...), to, 0); err != nil {
		return fmt.Errorf("sd_notify %s: %w", n.addr, err)
	}
	return nil
}

// Watchdog returns systemd's watchdog timeout (WatchdogSec=), or 0 if the
// service has none or it is meant for another process. predecessor is the
// pid of the master this one replaces (0 for none): systemd set
// WATCHDOG_PID for the first master of the service, and a successor that
// inherited the variable from its predecessor takes it over. The variable
// is rewritten to this process's pid so that its own successor can do the
// same. Beats are due at half the timeout, as sd_watchdog_enabled(3)
// advises.
func Watchdog(predecessor int) (time.Duration, error) {
	if p, err := strconv.Atoi(os.Getenv("WATCHDOG_PID")); err == nil && predecessor > 0 && p == predecessor {
		os.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	}
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		return 0, fmt.Errorf("watchdog: %w", err)
	}
	if d > 0 && os.Getenv("WATCHDOG_PID") == "" {
		// Set it, so that a successor recognises the variable as its
		// predecessor's.
		os.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	}
	return d, nil
}

// StoreMax returns the service's fd store size as systemd (254 and later)
// announces it in $FDSTORE, or 0 if it does not.
func StoreMax() int {
	n, err := strconv.Atoi(os.Getenv("FDSTORE"))
	if err != nil || n < 0 {
		return 0
	}
	return n
}

// errNoNotifier is returned by NewStore without a notify socket.
var errNoNotifier = errors.New("sdnotify: no NOTIFY_SOCKET: there is no service manager to keep descriptors")
