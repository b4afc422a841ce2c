package master

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/gorolling/gorolling/handoff"
	"golang.org/x/sys/unix"
)

// Socket is one listening socket the master holds for the socket's whole
// life. Workers get duplicates; the master's own descriptor keeps the
// socket, its port and its accept queue alive across generations.
type Socket struct {
	// Key is the registry key requests for this socket normalise to.
	Key handoff.Key
	// Network and Addr describe the bound socket as net reports them
	// ("tcp", "[::]:8080").
	Network string
	Addr    string
	// Persistent sockets (inherited or pre-opened) live as long as the
	// master; the others are closed once no live worker holds them.
	Persistent bool
	// Name is the socket's name for LISTEN_FDNAMES, if it has one.
	Name string

	fd        int    // the master's own copy: close-on-exec, non-blocking
	preopened bool   // passed to every worker as a LISTEN_FDS descriptor
	path      string // unix socket file the master created and removes at stop
	ino       uint64 // inode of path when bound: only that file is removed
	packet    bool
	// owner, if set, is the account the socket file was created as (a
	// socket opened for workers of another account): it is removed with
	// that account's credentials too. Without, the master created it
	// itself (--listen) and removes it relative to its directory.
	owner *Account
}

// FD returns the master's descriptor. It stays owned by the registry.
func (s *Socket) FD() int { return s.fd }

// Registry maps listen keys to sockets. It is safe for concurrent use.
type Registry struct {
	mu      sync.Mutex
	sockets map[handoff.Key]*Socket
	ports   map[handoff.Key]int // port-0 keys -> the port first assigned
	// owner is the account workers run as, when it is not the master's:
	// sockets the workers ask for are opened with its credentials, and
	// --listen socket files are given to it.
	owner *Account
	// reuseport gives each slot its own SO_REUSEPORT socket for TCP
	// listeners the workers ask for (per-slot reuseport mode).
	reuseport bool
	// max bounds how many sockets the registry opens on workers' requests
	// (0: no bound).
	max    int
	closed bool
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return newRegistry(nil) }

func newRegistry(owner *Account) *Registry {
	if owner.credential() == nil {
		owner = nil // workers run as the master: nothing to switch
	}
	return &Registry{
		sockets: make(map[handoff.Key]*Socket),
		ports:   make(map[handoff.Key]int),
		owner:   owner,
	}
}

// Has reports whether the registry holds a socket for k.
func (r *Registry) Has(k handoff.Key) bool {
	if k.Network == "fd" {
		k.Packet = false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sockets[k] != nil
}

// Error is a failed listen with the errno a worker should see. Errno is
// zero when the failure has no errno (a bad address, say).
type Error struct {
	Errno syscall.Errno
	Msg   string
}

// Error returns the failure as the master describes it.
func (e *Error) Error() string { return e.Msg }

// Unwrap lets errors.Is(err, syscall.EADDRINUSE) work.
func (e *Error) Unwrap() error {
	if e.Errno == 0 {
		return nil
	}
	return e.Errno
}

// ErrRegistryClosed is returned by Acquire after Close.
var ErrRegistryClosed = errors.New("master: registry closed")

// Acquire returns a duplicate (close-on-exec) of the socket for k, opening
// the socket first if this is the first request for it. The caller owns the
// duplicate and closes it after sending it. In reuseport mode a TCP
// listener that is not pre-opened or inherited is one socket per slot (the
// slot's successors inherit it); slot says which.
func (r *Registry) Acquire(k handoff.Key, slot int) (int, *Socket, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return -1, nil, ErrRegistryClosed
	}
	lookup := k
	if k.Network == "fd" {
		lookup.Packet = false // one entry per fd; the request's kind is checked below
	}
	s := r.sockets[lookup]
	if s == nil && r.reuseport && reusable(k) && slot >= 0 {
		k.Member = slot + 1
		s = r.sockets[k]
	}
	if s == nil {
		if k.Network == "fd" {
			return -1, nil, &Error{Errno: unix.EBADF, Msg: fmt.Sprintf("listen fd:%s: the master has no inherited socket on fd %s", k.Address, k.Address)}
		}
		if n := r.openedLocked(); r.max > 0 && n >= r.max {
			return -1, nil, &Error{Errno: unix.ENFILE, Msg: fmt.Sprintf("listen %s: the master already holds %d sockets for workers, the most --max-sockets allows", k, n)}
		}
		var err error
		s, err = r.open(k, r.owner, -1)
		if err != nil {
			return -1, nil, err
		}
		r.sockets[k] = s
	}
	if k.Network == "fd" {
		if err := checkFDKind(s, k.Packet); err != nil {
			return -1, nil, err
		}
	}
	// O_NONBLOCK belongs to the open file description every holder
	// shares, and any worker may have cleared it (a non-Go program that
	// switched its copy to blocking mode): a Go worker blocked in accept(2)
	// could not stop. Set it again each time the socket is handed out.
	if err := unix.SetNonblock(s.fd, true); err != nil {
		return -1, nil, &Error{Errno: errnoOf(err), Msg: fmt.Sprintf("set socket %s non-blocking: %v", k, err)}
	}
	dup, err := unix.FcntlInt(uintptr(s.fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, nil, &Error{Errno: errnoOf(err), Msg: fmt.Sprintf("dup socket %s: %v", k, err)}
	}
	return dup, s, nil
}

// openedLocked counts the sockets opened on workers' requests.
func (r *Registry) openedLocked() int {
	n := 0
	for _, s := range r.sockets {
		if !s.Persistent {
			n++
		}
	}
	return n
}

// memberKey returns the key of slot's member socket in reuseport mode, for
// a request that would get one.
func (r *Registry) memberKey(k handoff.Key, slot int) (handoff.Key, bool) {
	if !r.reuseport || !reusable(k) || slot < 0 {
		return handoff.Key{}, false
	}
	k.Member = slot + 1
	return k, true
}

// reusable reports whether k can be a per-slot SO_REUSEPORT group: TCP
// listeners only (UDP and unix sockets stay shared).
func reusable(k handoff.Key) bool {
	return strings.HasPrefix(k.Network, "tcp") && !k.Packet
}

func checkFDKind(s *Socket, packet bool) error {
	if packet != s.packet {
		if packet {
			return &Error{Errno: unix.EPROTOTYPE, Msg: fmt.Sprintf("listen fd:%s: fd %s is a stream socket, not a packet socket", s.Key.Address, s.Key.Address)}
		}
		return &Error{Errno: unix.EPROTOTYPE, Msg: fmt.Sprintf("listen fd:%s: fd %s is a datagram socket: use ListenPacket", s.Key.Address, s.Key.Address)}
	}
	if !packet {
		acc, err := unix.GetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
		if err != nil {
			return &Error{Errno: errnoOf(err), Msg: fmt.Sprintf("listen fd:%s: %v", s.Key.Address, err)}
		}
		if acc == 0 {
			return &Error{Errno: unix.EINVAL, Msg: fmt.Sprintf("listen fd:%s: fd %s is a socket that is not listening", s.Key.Address, s.Key.Address)}
		}
	}
	return nil
}

// open creates the socket for k. Called with r.mu held. With as set, every
// path and bind operation runs with that account's credentials, so the
// kernel applies its own rules to it (see runAs). umask >= 0 gives the
// socket file a mode from birth (0777 &^ umask); the master's other threads
// keep their own umask.
func (r *Registry) open(k handoff.Key, as *Account, umask int) (*Socket, error) {
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
		s, err = bindSocket(k, addr)
		if err == nil && path != "" {
			var st unix.Stat_t
			if unix.Lstat(path, &st) == nil {
				s.ino = st.Ino
			}
		}
		return err
	}
	var err error
	if as != nil || umask >= 0 {
		if umask < 0 {
			umask = processUmask()
		}
		err = runAs(as, umask, bind)
	} else {
		err = bind()
	}
	if err != nil {
		return nil, explainDenied(k, as, err)
	}
	s.Key, s.path, s.packet, s.owner = k, path, k.Packet, as
	if port0 {
		if _, p, err := net.SplitHostPort(s.Addr); err == nil {
			r.ports[pk], _ = strconv.Atoi(p)
		}
	}
	return s, nil
}

// processUmask reads the process's umask without changing it (umask(2)
// can only read it by setting it, which would race with other threads).
func processUmask() int {
	b, err := os.ReadFile("/proc/self/status")
	if err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "Umask:"); ok {
				if n, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32); err == nil {
					return int(n)
				}
			}
		}
	}
	return 0o022
}

// bindSocket creates, binds and (for streams) listens on the socket of k
// at addr, in the calling thread's credentials.
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
		ul.SetUnlinkOnClose(false)
	}
	return takeFD(l.(syscall.Conn), l.Addr(), l.Close)
}

// explainDenied turns a failed open into the Error a worker gets. A
// refusal the kernel made because the workers' account may not do it says
// how the operator can hand the socket over instead.
func explainDenied(k handoff.Key, as *Account, err error) error {
	var e *Error
	if !errors.As(err, &e) {
		e = &Error{Errno: errnoOf(err), Msg: err.Error()}
	}
	if as != nil && (e.Errno == unix.EACCES || e.Errno == unix.EPERM) {
		e = &Error{Errno: e.Errno, Msg: fmt.Sprintf("%s (workers run as %s, and the kernel refuses %s this; pre-declare the socket with --listen)", e.Msg, as.User, as.User)}
	}
	return e
}

// takeFD duplicates the descriptor of a socket net created, then closes
// net's own copy, so the master holds a raw descriptor that is not
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

// clearStaleUnix removes a socket file left behind by a process that is
// gone (connect gets ECONNREFUSED), and refuses a path where something still
// listens. It works by path in the calling thread's credentials: call it
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

// Adopt registers an inherited socket descriptor under the key fd:N. The
// registry takes ownership of fd, marks it close-on-exec and non-blocking,
// and keeps it for the master's life.
func (r *Registry) Adopt(fd int, name string) (*Socket, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return nil, fmt.Errorf("adopt fd %d: %w", fd, err)
	}
	dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return nil, fmt.Errorf("adopt fd %d: %w", fd, err)
	}
	unix.CloseOnExec(fd)
	// Shared sockets must be non-blocking: O_NONBLOCK belongs to the open
	// file description, which every worker shares, and a worker that
	// blocks in accept(2) on a shared socket cannot stop (PITFALLS #7).
	// systemd and shells hand sockets over in blocking mode.
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("adopt fd %d: set non-blocking: %w", fd, err)
	}
	s := &Socket{
		Key:        handoff.Key{Network: "fd", Address: strconv.Itoa(fd)},
		fd:         fd,
		Persistent: true,
		Name:       name,
		packet:     typ == unix.SOCK_DGRAM,
	}
	s.Network, s.Addr = describe(fd, dom, typ)
	r.mu.Lock()
	defer r.mu.Unlock()
	if old := r.sockets[s.Key]; old != nil {
		return nil, fmt.Errorf("adopt fd %d: already adopted", fd)
	}
	r.sockets[s.Key] = s
	return s, nil
}

func describe(fd, dom, typ int) (string, string) {
	var network string
	switch {
	case dom == unix.AF_UNIX && typ == unix.SOCK_STREAM:
		network = "unix"
	case dom == unix.AF_UNIX && typ == unix.SOCK_SEQPACKET:
		network = "unixpacket"
	case dom == unix.AF_UNIX && typ == unix.SOCK_DGRAM:
		network = "unixgram"
	case typ == unix.SOCK_DGRAM:
		network = "udp"
	default:
		network = "tcp"
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return network, ""
	}
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return network, net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
	case *unix.SockaddrInet6:
		return network, net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
	case *unix.SockaddrUnix:
		return network, a.Name
	}
	return network, ""
}

// Collect closes every non-persistent socket for which inUse reports false,
// and removes the unix socket files of those it closes. Port-0 assignments
// are kept, so a later request for the same key binds the same port again.
func (r *Registry) Collect(inUse func(handoff.Key) bool) []*Socket {
	r.mu.Lock()
	defer r.mu.Unlock()
	var gone []*Socket
	for k, s := range r.sockets {
		if s.Persistent || inUse(k) {
			continue
		}
		delete(r.sockets, k)
		s.close(true)
		gone = append(gone, s)
	}
	return gone
}

// Sockets returns the registered sockets, sorted by key.
func (r *Registry) Sockets() []*Socket {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*Socket, 0, len(r.sockets))
	for _, s := range r.sockets {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key.String() < out[j].Key.String() })
	return out
}

// Close closes every socket. With removeFiles it also removes the unix
// socket files the master created (a final stop); without, the files stay
// for a successor that holds the same sockets. Acquire fails afterwards.
func (r *Registry) Close(removeFiles bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for k, s := range r.sockets {
		s.close(removeFiles)
		delete(r.sockets, k)
	}
	r.closed = true
}

func (s *Socket) close(removeFile bool) {
	unix.Close(s.fd)
	s.fd = -1
	if removeFile && s.path != "" {
		removeSocketFile(s.path, s.ino, s.owner)
	}
}

// removeSocketFile removes the socket file at path if it is still the one
// the master created (inode ino). A file created for workers is removed
// with their account's credentials, so the kernel judges the path as it
// would for them; one the master created itself is removed relative to its
// directory, opened without following symlinks.
func removeSocketFile(path string, ino uint64, owner *Account) {
	same := func(st *unix.Stat_t) bool {
		return st.Mode&unix.S_IFMT == unix.S_IFSOCK && st.Ino == ino
	}
	if owner != nil {
		_ = runAs(owner, 0o077, func() error {
			var st unix.Stat_t
			if unix.Lstat(path, &st) == nil && same(&st) {
				return unix.Unlink(path)
			}
			return nil
		})
		return
	}
	dir, base := filepath.Split(path)
	dfd, err := openDirNoFollow(dir)
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
// a, without following a symlink anywhere on the way: the directory is
// opened without symlinks, and the file itself is pinned by an O_PATH
// descriptor and checked to be what bind made (a socket with one link,
// owned by the master) before its owner changes. A hard link to another
// file, or a file swapped in, is refused. It returns the file's inode.
func chownSocketFile(path string, a *Account) (uint64, error) {
	dir, base := filepath.Split(path)
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return 0, err
	}
	dfd, err := openDirNoFollow(real)
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

func errnoOf(err error) syscall.Errno {
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	return 0
}

// Preopen opens the socket of a --listen spec, or takes the adopted
// inherited socket it names, and keeps it for the master's life. A socket
// opened on port 0 is registered under the port it got, so that a worker's
// Listen on that address shares it.
func (r *Registry) Preopen(ls ListenSpec) (*Socket, error) {
	if ls.Network == "fd" {
		r.mu.Lock()
		defer r.mu.Unlock()
		var found *Socket
		var names []string
		for _, s := range r.sockets {
			if s.Key.Network != "fd" {
				continue
			}
			if s.Name != "" {
				names = append(names, s.Name)
			}
			if (ls.FD >= 0 && s.fd == ls.FD) || (ls.FDName != "" && s.Name == ls.FDName) {
				found = s
			}
		}
		if found == nil {
			if ls.FD >= 0 {
				return nil, fmt.Errorf("--listen %q: the master has no inherited socket on fd %d", ls.Spec, ls.FD)
			}
			sort.Strings(names)
			return nil, fmt.Errorf("--listen %q: no inherited socket is named %q (LISTEN_FDNAMES gave: %s)", ls.Spec, ls.FDName, strings.Join(names, ", "))
		}
		if found.preopened {
			return nil, fmt.Errorf("--listen %q: that socket is listed twice", ls.Spec)
		}
		found.preopened = true
		if ls.Name != "" {
			found.Name = ls.Name
		}
		return found, nil
	}
	k, err := handoff.Normalize(&handoff.ListenRequest{Network: ls.Network, Address: ls.Address, Packet: ls.Packet()})
	if err != nil {
		return nil, fmt.Errorf("--listen %q: %w", ls.Spec, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sockets[k] != nil {
		return nil, fmt.Errorf("--listen %q: that socket is listed twice", ls.Spec)
	}
	// The master binds --listen sockets itself (they are how the operator
	// hands workers what their account could not open). A mode is set
	// through the umask of the binding thread, so the file is born with it.
	umask := -1
	if ls.Mode != 0 {
		umask = int(0o777 &^ ls.Mode)
	}
	s, err := r.open(k, nil, umask)
	if err != nil {
		return nil, fmt.Errorf("--listen %q: %w", ls.Spec, err)
	}
	if s.path != "" && r.owner != nil {
		ino, err := chownSocketFile(s.path, r.owner)
		if err != nil {
			s.close(true)
			return nil, fmt.Errorf("--listen %q: give the socket file to %s: %w", ls.Spec, r.owner.User, err)
		}
		s.ino = ino
	}
	if p := k.Port(); p == 0 && !strings.HasPrefix(k.Network, "unix") {
		if _, port, err := net.SplitHostPort(s.Addr); err == nil {
			n, _ := strconv.Atoi(port)
			k.Address = k.WithPort(n)
			s.Key = k
			delete(r.ports, handoff.Key{Network: k.Network, Address: k.WithPort(0), Packet: k.Packet})
		}
	}
	if r.sockets[k] != nil {
		s.close(true)
		return nil, fmt.Errorf("--listen %q: that socket is listed twice", ls.Spec)
	}
	s.Persistent, s.preopened = true, true
	s.Name = ls.Name
	r.sockets[k] = s
	return s, nil
}
