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

// openSocket creates the socket for k, on the port of an earlier
// socket of the same key if havePort. With as set, every path and bind
// operation runs with that account's credentials, so the kernel applies its
// own rules to it (see account.RunAs). It is called without the registry's
// lock.
func openSocket(k handoff.Key, port int, havePort bool, as *account.Account) (*Socket, error) {
	addr := k.Address
	if havePort && !strings.HasPrefix(k.Network, "unix") && k.Port() == 0 {
		addr = k.WithPort(port)
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
	if as != nil {
		err = account.RunAs(as, procfs.Umask(), bind)
	} else {
		err = bind()
	}
	if err != nil {
		return nil, explainDenied(as, err)
	}
	s.Key, s.path, s.packet, s.owner = k, path, k.Packet, as
	return s, nil
}

// openUnixAsMaster creates the socket of a --listen unix key k itself,
// with the master's rights, without following a symlink as root: the
// directory is opened once without symlinks, and the stale-socket probe and
// the bind use names relative to it, on a thread whose working directory is
// that directory (its filesystem context is private, see account.RunAs).
// umask >= 0 gives the file its mode from birth. listen(2) runs with the
// workers' credentials when they run as another account, so that a client
// checking who serves the socket (SO_PEERCRED) sees the workers' account,
// not root: they serve it. An abstract socket (@name) has no directory.
func (r *Registry) openUnixAsMaster(k handoff.Key, umask int) (*Socket, error) {
	typ := unixType(k.Network)
	dfd, base := -1, k.Address
	if !strings.HasPrefix(k.Address, "@") {
		var dir string
		dir, base = filepath.Split(k.Address)
		var err error
		if dfd, err = account.OpenDirNoFollow(dir); err != nil {
			if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EXDEV) {
				real, _ := filepath.EvalSymlinks(dir)
				return nil, fmt.Errorf("the path %s goes through a symlink; give the path it points to (%s): the master never follows a link as root", dir, filepath.Join(real, base))
			}
			return nil, fmt.Errorf("open %s: %w", dir, err)
		}
		defer unix.Close(dfd)
	}
	if umask < 0 {
		umask = procfs.Umask()
	}
	fd := -1
	err := account.RunAs(nil, umask, func() error {
		if dfd >= 0 {
			if err := unix.Fchdir(dfd); err != nil {
				return err
			}
			if err := clearStaleUnix(k.Network, base); err != nil {
				return err
			}
		}
		var err error
		if fd, err = unix.Socket(unix.AF_UNIX, typ|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0); err != nil {
			return os.NewSyscallError("socket", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrUnix{Name: base}); err != nil {
			unix.Close(fd)
			fd = -1
			return &reqError{Errno: errnoOf(err), Msg: fmt.Sprintf("listen %s %s: bind: %v", k.Network, k.Address, err)}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s := &Socket{fd: fd, Network: k.Network, Addr: k.Address, Key: k, packet: k.Packet}
	if dfd >= 0 {
		s.path = k.Address
	}
	fail := func(err error) (*Socket, error) {
		s.close(true)
		return nil, err
	}
	if dfd >= 0 {
		var st unix.Stat_t
		if err := unix.Fstatat(dfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fail(err)
		}
		s.ino = st.Ino
	}
	if typ != unix.SOCK_DGRAM {
		listen := func() error { return os.NewSyscallError("listen", unix.Listen(fd, backlog())) }
		if r.opt.Owner != nil {
			err = account.RunAs(r.opt.Owner, 0o077, listen)
		} else {
			err = listen()
		}
		if err != nil {
			return fail(err)
		}
	}
	if dfd >= 0 && r.opt.Owner != nil {
		if err := chownSocketFile(dfd, base, s.ino, r.opt.Owner); err != nil {
			return fail(fmt.Errorf("give %s to %s: %w", k.Address, r.opt.Owner.User, err))
		}
	}
	return s, nil
}

func unixType(network string) int {
	switch network {
	case "unixpacket":
		return unix.SOCK_SEQPACKET
	case "unixgram":
		return unix.SOCK_DGRAM
	}
	return unix.SOCK_STREAM
}

// backlog is the listen backlog Go itself uses: net.core.somaxconn.
func backlog() int {
	b, err := os.ReadFile("/proc/sys/net/core/somaxconn")
	if err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n > 0 {
			return min(n, 65535)
		}
	}
	return 4096
}

// bindSocket creates, binds and (for streams) listens on the socket of k
// at addr, with the calling thread's credentials.
func bindSocket(k handoff.Key, addr string) (*Socket, error) {
	var lc net.ListenConfig
	if k.Member > 0 {
		// Plain TCP, not Go's default MPTCP: the kernel steers a
		// reuseport group with BPF (package placement) only for TCP
		// sockets. MPTCP clients still connect, as plain TCP.
		lc.SetMultipathTCP(false)
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
	var e *reqError
	if !errors.As(err, &e) {
		e = &reqError{Errno: errnoOf(err), Msg: err.Error()}
	}
	if as != nil && (e.Errno == unix.EACCES || e.Errno == unix.EPERM) {
		e = &reqError{Errno: e.Errno, Msg: fmt.Sprintf("%s (workers run as %s, and the kernel refuses %s this; pre-declare the socket with --listen)", e.Msg, as.User, as.User)}
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
	fd, err := unix.Socket(unix.AF_UNIX, unixType(network)|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return &reqError{Errno: errnoOf(err), Msg: fmt.Sprintf("listen %s %s: probe for a stale socket: %v", network, path, err)}
	}
	err = unix.Connect(fd, &unix.SockaddrUnix{Name: path})
	unix.Close(fd)
	switch {
	case err == nil || errors.Is(err, unix.EAGAIN):
		return &reqError{Errno: unix.EADDRINUSE, Msg: fmt.Sprintf("listen %s %s: another process is listening on this socket: address already in use", network, path)}
	case errors.Is(err, unix.ECONNREFUSED):
		if err := unix.Unlink(path); err != nil && !errors.Is(err, unix.ENOENT) {
			return &reqError{Errno: unix.EADDRINUSE, Msg: fmt.Sprintf("listen %s %s: a stale socket file is in the way and may not be removed: %v", network, path, err)}
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

// chownSocketFile gives the socket file the master just bound, base in
// the directory dfd (opened without symlinks), to a. The file is pinned by
// an O_PATH descriptor opened without following a symlink and checked to
// be what bind made (a socket with one link, owned by the master, inode
// ino) before its owner changes: a hard link to another file, or a file
// swapped in meanwhile, is refused.
func chownSocketFile(dfd int, base string, ino uint64, a *account.Account) error {
	fd, err := unix.Openat(dfd, base, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK || st.Nlink != 1 || int(st.Uid) != os.Geteuid() || st.Ino != ino {
		return fmt.Errorf("%s is no longer the socket file just bound (replaced while it was set up)", base)
	}
	return unix.Fchownat(fd, "", int(a.UID), int(a.GID), unix.AT_EMPTY_PATH)
}
