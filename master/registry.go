package master

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

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
}

// FD returns the master's descriptor. It stays owned by the registry.
func (s *Socket) FD() int { return s.fd }

// Registry maps listen keys to sockets. It is safe for concurrent use.
type Registry struct {
	mu      sync.Mutex
	sockets map[handoff.Key]*Socket
	ports   map[handoff.Key]int // port-0 keys -> the port first assigned
	owner   *Account            // gets the unix socket files, if set
	// reuseport gives each slot its own SO_REUSEPORT socket for TCP
	// listeners the workers ask for (per-slot reuseport mode).
	reuseport bool
	closed    bool
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return newRegistry(nil) }

func newRegistry(owner *Account) *Registry {
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
		var err error
		s, err = r.open(k)
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
	dup, err := unix.FcntlInt(uintptr(s.fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, nil, &Error{Errno: errnoOf(err), Msg: fmt.Sprintf("dup socket %s: %v", k, err)}
	}
	return dup, s, nil
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

// open creates the socket for k. Called with r.mu held.
func (r *Registry) open(k handoff.Key) (*Socket, error) {
	addr := k.Address
	port0 := false
	pk := k.Shared() // port-0 assignments are shared by a group's members
	if !strings.HasPrefix(k.Network, "unix") && k.Port() == 0 {
		port0 = true
		if p, ok := r.ports[pk]; ok {
			addr = k.WithPort(p)
		}
	}
	var path string
	if strings.HasPrefix(k.Network, "unix") && !strings.HasPrefix(k.Address, "@") {
		path = k.Address
		if err := clearStaleUnix(k.Network, path); err != nil {
			return nil, err
		}
	}
	ctx := context.Background()
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
	var s *Socket
	var err error
	if k.Packet {
		var pc net.PacketConn
		pc, err = lc.ListenPacket(ctx, k.Network, addr)
		if err == nil {
			s, err = takeFD(pc.(syscall.Conn), pc.LocalAddr(), pc.Close)
		}
	} else {
		var l net.Listener
		l, err = lc.Listen(ctx, k.Network, addr)
		if err == nil {
			if ul, ok := l.(*net.UnixListener); ok {
				ul.SetUnlinkOnClose(false)
			}
			s, err = takeFD(l.(syscall.Conn), l.Addr(), l.Close)
		}
	}
	if err != nil {
		return nil, &Error{Errno: errnoOf(err), Msg: err.Error()}
	}
	s.Key, s.path, s.packet = k, path, k.Packet
	if path != "" {
		var st unix.Stat_t
		if unix.Lstat(path, &st) == nil {
			s.ino = st.Ino
		}
		if err := r.owner.chown(path); err != nil {
			s.close(true)
			return nil, &Error{Errno: errnoOf(err), Msg: fmt.Sprintf("chown %s: %v", path, err)}
		}
	}
	if port0 {
		if _, p, err := net.SplitHostPort(s.Addr); err == nil {
			r.ports[pk], _ = strconv.Atoi(p)
		}
	}
	return s, nil
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
// listens.
func clearStaleUnix(network, path string) error {
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode()&os.ModeSocket == 0 {
		return nil // absent, or not a socket: bind reports the real error
	}
	c, err := net.DialTimeout(network, path, time.Second)
	if err == nil {
		c.Close()
		return &Error{Errno: unix.EADDRINUSE, Msg: fmt.Sprintf("listen %s %s: another process is listening on this socket: address already in use", network, path)}
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		if rerr := os.Remove(path); rerr != nil && !os.IsNotExist(rerr) {
			return &Error{Errno: errnoOf(rerr), Msg: fmt.Sprintf("remove stale socket %s: %v", path, rerr)}
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
		var st unix.Stat_t
		if unix.Lstat(s.path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFSOCK && st.Ino == s.ino {
			os.Remove(s.path)
		}
	}
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
	s, err := r.open(k)
	if err != nil {
		return nil, fmt.Errorf("--listen %q: %w", ls.Spec, err)
	}
	if ls.Mode != 0 && s.path != "" {
		// The socket exists with the umask's mode between bind and this
		// chmod; the mode only ever widens or narrows access for the
		// short window, and nothing is handed out before it ends.
		if err := os.Chmod(s.path, ls.Mode); err != nil {
			s.close(true)
			return nil, fmt.Errorf("--listen %q: %w", ls.Spec, err)
		}
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
