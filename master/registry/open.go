package registry

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/gorolling/gorolling/handoff"
	"github.com/gorolling/gorolling/master/account"
	"github.com/gorolling/gorolling/master/procfs"
	"golang.org/x/sys/unix"
)

// open creates the socket for k. Called with r.mu held. With as set, every
// path and bind operation runs with that account's credentials, so the
// kernel applies its own rules to it (see account.RunAs). umask >= 0 gives
// the socket file a mode from birth (0777 &^ umask); the master's other
// threads keep their own umask.
func (r *Registry) open(k handoff.Key, as *account.Account, umask int) (*Socket, error) {
	addr := k.Address
	port0 := false
	pk := k.Shared() // port-0 assignments are shared by a group's members
	if !strings.HasPrefix(k.Network, "unix") && k.Port() == 0 {
		port0 = true
		if p, ok := r.ports[pk]; ok {
			addr = k.WithPort(p)
		}
	}
	path := ""
	if strings.HasPrefix(k.Network, "unix") && !strings.HasPrefix(k.Address, "@") {
		path = k.Address
	}
	var s *Socket
	bind := func() error {
		if path != "" {
			if err := clearStaleUnix(k.Network, path); err != nil {
				return err
			}
		}
		var err error
		if s, err = bindSocket(k, addr); err != nil {
			return err
		}
		if path != "" {
			var st unix.Stat_t
			if unix.Lstat(path, &st) == nil {
				s.ino = st.Ino
			}
		}
		return nil
	}
	var err error
	if as != nil || umask >= 0 {
		if umask < 0 {
			umask = procfs.Umask()
		}
		err = account.RunAs(as, umask, bind)
	} else {
		err = bind()
	}
	if err != nil {
		return nil, explainDenied(as, err)
	}
	s.Key, s.path, s.packet, s.owner = k, path, k.Packet, as
	if port0 {
		if _, p, err := net.SplitHostPort(s.Addr); err == nil {
			r.ports[pk], _ = strconv.Atoi(p)
		}
	}
	return s, nil
}

// bindSocket creates, binds and (for streams) listens on the socket of k
// at addr, with the calling thread's credentials.
func bindSocket(k handoff.Key, addr string) (*Socket, error) {
	var lc net.ListenConfig
	if k.Member > 0 {
		lc.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	ctx := context.Background()
	if k.Packet {
		pc, err := lc.ListenPacket(ctx, k.Network, addr)
		if err != nil {
			return nil, err
		}
		return takeFD(pc.(syscall.Conn), pc.LocalAddr(), pc.Close)
	}
	l, err := lc.Listen(ctx, k.Network, addr)
	if err != nil {
		return nil, err
	}
	if ul, ok := l.(*net.UnixListener); ok {
		// Closing net's copy below must not unlink the file.
		ul.SetUnlinkOnClose(false)
	}
	return takeFD(l.(syscall.Conn), l.Addr(), l.Close)
}

// takeFD duplicates the descriptor of a socket net created, then closes
// net's own copy, so the registry holds a raw descriptor that is not
// registered with the runtime poller (the master never accepts, and a
// registered listener would wake it on every connection).
func takeFD(c syscall.Conn, a net.Addr, closeFn func() error) (*Socket, error) {
	defer closeFn()
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var dup int
	var derr error
	if err := rc.Control(func(fd uintptr) {
		dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, os.NewSyscallError("fcntl", derr)
	}
	return &Socket{fd: dup, Network: a.Network(), Addr: a.String()}, nil
}

// explainDenied turns a failed open into the Error a worker gets. A
// refusal the kernel made because the workers' account may not do it says
// how the operator can hand the socket over instead.
func explainDenied(as *account.Account, err error) error {
	var e *Error
	if !errors.As(err, &e) {
		e = &Error{Errno: errnoOf(err), Msg: err.Error()}
	}
	if as != nil && (e.Errno == unix.EACCES || e.Errno == unix.EPERM) {
		e = &Error{Errno: e.Errno, Msg: fmt.Sprintf("%s (workers run as %s, and the kernel refuses %s this; pre-declare the socket with --listen)", e.Msg, as.User, as.User)}
	}
	return e
}

// clearStaleUnix removes a socket file left behind by a process that is
// gone (connect gets ECONNREFUSED), and refuses a path where something still
// listens. It works by path with the calling thread's credentials: call it
// with the credentials of whoever the socket is for.
func clearStaleUnix(network, path string) error {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil // absent, unreachable or not a socket: bind reports the real error
	}
	typ := unix.SOCK_STREAM
	switch network {
	case "unixpacket":
		typ = unix.SOCK_SEQPACKET
	case "unixgram":
		typ = unix.SOCK_DGRAM
	}
	fd, err := unix.Socket(unix.AF_UNIX, typ|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return &Error{Errno: errnoOf(err), Msg: fmt.Sprintf("listen %s %s: probe for a stale socket: %v", network, path, err)}
	}
	err = unix.Connect(fd, &unix.SockaddrUnix{Name: path})
	unix.Close(fd)
	switch {
	case err == nil || errors.Is(err, unix.EAGAIN):
		return &Error{Errno: unix.EADDRINUSE, Msg: fmt.Sprintf("listen %s %s: another process is listening on this socket: address already in use", network, path)}
	case errors.Is(err, unix.ECONNREFUSED):
		if err := unix.Unlink(path); err != nil && !errors.Is(err, unix.ENOENT) {
			return &Error{Errno: unix.EADDRINUSE, Msg: fmt.Sprintf("listen %s %s: a stale socket file is in the way and may not be removed: %v", network, path, err)}
		}
	}
	return nil
}

// removeSocketFile removes the socket file at path if it is still the one
// the registry created (inode ino). A file created for workers is removed
// with their account's credentials, so the kernel judges the path as it
// would for them; one the master created itself is removed relative to its
// directory, opened without following symlinks.
func removeSocketFile(path string, ino uint64, owner *account.Account) {
	same := func(st *unix.Stat_t) bool {
		return st.Mode&unix.S_IFMT == unix.S_IFSOCK && st.Ino == ino
	}
	if owner != nil {
		_ = account.RunAs(owner, 0o077, func() error {
			var st unix.Stat_t
			if unix.Lstat(path, &st) == nil && same(&st) {
				return unix.Unlink(path)
			}
			return nil
		})
		return
	}
	dir, base := filepath.Split(path)
	dfd, err := account.OpenDirNoFollow(dir)
	if err != nil {
		return
	}
	defer unix.Close(dfd)
	var st unix.Stat_t
	if unix.Fstatat(dfd, base, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && same(&st) {
		_ = unix.Unlinkat(dfd, base, 0)
	}
}

// chownSocketFile gives the socket file the master just bound at path to
// a, without following a symlink anywhere on the way: the directory (its
// symlinks resolved once, as the operator set them up) is opened without
// symlinks, and the file itself is pinned by an O_PATH descriptor and
// checked to be what bind made (a socket with one link, owned by the
// master) before its owner changes. A hard link to another file, or a file
// swapped in meanwhile, is refused. It returns the file's inode.
func chownSocketFile(path string, a *account.Account) (uint64, error) {
	dir, base := filepath.Split(path)
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return 0, err
	}
	dfd, err := account.OpenDirNoFollow(real)
	if err != nil {
		return 0, fmt.Errorf("open %s: %w", dir, err)
	}
	defer unix.Close(dfd)
	fd, err := unix.Openat(dfd, base, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("open %s: %w", path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK || st.Nlink != 1 || int(st.Uid) != os.Geteuid() {
		return 0, fmt.Errorf("%s is no longer the socket file just bound (replaced while it was set up)", path)
	}
	if err := unix.Fchownat(fd, "", int(a.UID), int(a.GID), unix.AT_EMPTY_PATH); err != nil {
		return 0, err
	}
	return st.Ino, nil
}
