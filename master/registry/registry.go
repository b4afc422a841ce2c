// Package registry owns the listening sockets of a gorolling master: one
// socket per listen key, opened on the first request for it and duplicated
// to every worker that asks, in this and every later generation. It owns
// the listen rules (Node's cluster semantics; keys come from
// handoff.Normalize), the creation of sockets with the workers' own
// credentials, the sockets' lifetime, the --listen and inherited sockets,
// and the state a master passes to its successor.
//
// Invariants:
//   - The registry holds exactly one descriptor of each socket, raw (never
//     wrapped in an *os.File, never registered with the runtime poller),
//     close-on-exec and non-blocking. Everything it hands out is a
//     duplicate the caller owns.
//   - A socket a worker asks for, and its unix socket file, are created and
//     removed with the workers' credentials (account.RunAs), so the kernel
//     decides what a worker may have; no permission is checked here.
//   - Sockets declared with --listen and sockets the master inherited live
//     as long as the registry; the others until Collect finds no holder.
//   - A unix socket file is removed only if it is still the one the
//     registry created (same inode), and never by closing a descriptor.
package registry

import (
	"errors"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/handoff"
	"github.com/gorolling/gorolling/master/account"
	"golang.org/x/sys/unix"
)

// Socket is one listening socket the registry holds for the socket's whole
// life. Its exported fields do not change after it is registered.
type Socket struct {
	// Key is the registry key requests for this socket normalise to.
	Key handoff.Key
	// Network and Addr describe the bound socket as net reports them
	// ("tcp", "[::]:8080").
	Network, Addr string
	// Name is the socket's name for LISTEN_FDNAMES, if it has one.
	Name string

	fd         int    // the registry's own copy: close-on-exec, non-blocking
	persistent bool   // --listen or inherited: lives as long as the registry
	preopened  bool   // passed to every worker as a LISTEN_FDS descriptor
	packet     bool   // a datagram socket
	path       string // unix socket file the registry created
	ino        uint64 // inode of path when bound: only that file is removed
	// owner, if set, is the account path was created as (a socket opened
	// for workers of another account): it is removed with that account's
	// credentials too. Without, the master created it itself (--listen)
	// and removes it relative to its directory.
	owner *account.Account
	// spec is a --listen socket's key as its spec gave it (port 0 stays
	// 0): what names it in the fd store.
	spec handoff.Key
	// fromStore: the socket came back from systemd's fd store after the
	// previous master died; storeIndex is the --listen position it had.
	fromStore  bool
	storeIndex int
}

// Kind names the socket's origin for status: "pre-opened" (--listen),
// "inherited" (from systemd or a shell), or "shared" (opened on a worker's
// request).
func (s *Socket) Kind() string {
	switch {
	case s.preopened:
		return "pre-opened"
	case s.persistent:
		return "inherited"
	}
	return "shared"
}

// Dup returns a new close-on-exec descriptor of the socket, which the
// caller owns. It sets O_NONBLOCK on the socket first: the flag belongs to
// the open file description every holder shares, and any worker may have
// cleared it (a program that switched its copy to blocking mode), which
// would leave a Go worker blocked in accept(2), unable to stop.
func (s *Socket) Dup() (int, error) {
	if err := unix.SetNonblock(s.fd, true); err != nil {
		return -1, &reqError{Errno: errnoOf(err), Msg: fmt.Sprintf("set socket %s non-blocking: %v", s.Key, err)}
	}
	d, err := unix.FcntlInt(uintptr(s.fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, &reqError{Errno: errnoOf(err), Msg: fmt.Sprintf("dup socket %s: %v", s.Key, err)}
	}
	return d, nil
}

// Options configure a Registry.
type Options struct {
	// Owner is the account workers run as, when it is not the master's
	// (nil: the master's). Sockets workers ask for are opened with its
	// credentials, and --listen socket files are given to it.
	Owner *account.Account
	// ReusePort gives each slot its own SO_REUSEPORT socket for the TCP
	// listeners workers ask for (not for --listen or inherited ones).
	ReusePort bool
	// Max bounds the sockets opened on workers' requests (0: no bound);
	// past it a request fails with ENFILE.
	Max int
	// Changed, if set, is called whenever a socket is added or closed
	// (not by Close), so that a copy of the set elsewhere (systemd's fd
	// store) can follow. It is called with the registry's lock held: it
	// must neither block nor call the registry.
	Changed func()
}

// Registry maps listen keys to sockets. It is safe for concurrent use.
type Registry struct {
	opt Options

	mu        sync.Mutex
	sockets   map[handoff.Key]*Socket
	opening   map[handoff.Key]chan struct{} // opens in progress, closed when done
	assigning map[handoff.Key]chan struct{} // port-0 member groups whose first member is being opened
	ports     map[handoff.Key]int           // port-0 keys -> the port assigned
	preopened []*Socket                     // in LISTEN_FDS order
	unclaimed []*Socket                     // --listen sockets back from the fd store, until Preopen claims them
	closed    bool
	removing  sync.WaitGroup // socket files being removed
}

// New returns an empty registry.
func New(opt Options) *Registry {
	return &Registry{
		opt:       opt,
		sockets:   make(map[handoff.Key]*Socket),
		opening:   make(map[handoff.Key]chan struct{}),
		assigning: make(map[handoff.Key]chan struct{}),
		ports:     make(map[handoff.Key]int),
	}
}

// reqError is a failed request with the errno a worker should see. Errno is
// zero when the failure has none (a bad address, say).
type reqError struct {
	Errno syscall.Errno
	Msg   string
}

// Error returns the failure as the registry describes it.
func (e *reqError) Error() string { return e.Msg }

// Unwrap lets errors.Is(err, syscall.EADDRINUSE) work.
func (e *reqError) Unwrap() error {
	if e.Errno == 0 {
		return nil
	}
	return e.Errno
}

// errClosed is returned by Acquire after Close.
var errClosed = errors.New("registry: closed")

// lookup is the map key a request for k is held under: one entry per
// inherited fd, whatever kind the request asks for (checked later).
func lookup(k handoff.Key) handoff.Key {
	if k.Network == "fd" {
		k.Packet = false
	}
	return k
}

// Acquire returns a duplicate (close-on-exec) of the socket for k, opening
// the socket first, with the workers' credentials, if this is the first
// request for it. The caller owns the duplicate. In reuseport mode a TCP
// request that no --listen or inherited socket answers gets the member
// socket of slot (see MemberKey). A failure is an *reqError with the errno the
// kernel gave, or ENFILE past Options.Max.
func (r *Registry) Acquire(k handoff.Key, slot int) (int, *Socket, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var s *Socket
	for {
		if r.closed {
			return -1, nil, errClosed
		}
		s = r.sockets[lookup(k)]
		if s == nil {
			if mk, ok := r.MemberKey(k, slot); ok {
				k = mk
				s = r.sockets[k]
			}
		}
		wait, busy := r.opening[k]
		if s == nil && !busy && k.Member > 0 && k.Port() == 0 {
			// The reuseport members of a port-0 address must all bind the
			// port the first of them got. Members are opened under their
			// own keys, so without this wait the first workers of a
			// generation, asking at once, would each bind a port of their
			// own, and the slots off the advertised port would get no
			// connection at all.
			if _, known := r.ports[k.Shared()]; !known {
				wait, busy = r.assigning[k.Shared()]
			}
		}
		if s != nil || !busy {
			break
		}
		// Another request opens this socket: wait for it without holding
		// the lock, so that a path lookup that hangs (a dead network
		// mount a worker named) holds up only the requests for that path.
		r.mu.Unlock()
		<-wait
		r.mu.Lock()
	}
	if s == nil {
		if k.Network == "fd" {
			return -1, nil, &reqError{Errno: unix.EBADF, Msg: fmt.Sprintf("listen fd:%s: the master has no inherited socket on fd %s", k.Address, k.Address)}
		}
		// Opens in progress count too: the lock is let go while a socket
		// is opened, and workers asking at once must not overshoot.
		if n := r.openedLocked() + len(r.opening); r.opt.Max > 0 && n >= r.opt.Max {
			return -1, nil, &reqError{Errno: unix.ENFILE, Msg: fmt.Sprintf("listen %s: the master already holds %d sockets for workers, the most --max-sockets allows", k, n)}
		}
		done := make(chan struct{})
		r.opening[k] = done
		port, havePort := r.ports[k.Shared()]
		assigns := k.Member > 0 && k.Port() == 0 && !havePort
		if assigns {
			r.assigning[k.Shared()] = done
		}
		r.mu.Unlock()
		var err error
		s, err = openSocket(k, port, havePort, r.opt.Owner)
		r.mu.Lock()
		delete(r.opening, k)
		if assigns {
			delete(r.assigning, k.Shared())
		}
		close(done)
		if err != nil {
			return -1, nil, err
		}
		if r.closed {
			s.close(true)
			return -1, nil, errClosed
		}
		r.sockets[k] = s
		if k.Port() == 0 && !strings.HasPrefix(k.Network, "unix") {
			if _, p, err := net.SplitHostPort(s.Addr); err == nil {
				r.ports[k.Shared()], _ = strconv.Atoi(p)
			}
		}
		r.changedLocked()
	}
	if k.Network == "fd" {
		if err := handoff.CheckListener(s.fd, k.Packet); err != nil {
			return -1, nil, &reqError{Errno: errnoOf(err), Msg: fmt.Sprintf("listen fd:%s: %v", k.Address, err)}
		}
	}
	d, err := s.Dup()
	if err != nil {
		return -1, nil, err
	}
	return d, s, nil
}

// MemberKey returns the key of slot's own socket in reuseport mode, for a
// request that would get one: TCP listeners only (UDP and unix sockets stay
// shared). A slot's replacement and its successor in the next generation
// get the same member, so no member closes during an upgrade.
func (r *Registry) MemberKey(k handoff.Key, slot int) (handoff.Key, bool) {
	if !r.opt.ReusePort || !strings.HasPrefix(k.Network, "tcp") || k.Packet || slot < 0 {
		return handoff.Key{}, false
	}
	k.Member = slot + 1
	return k, true
}

// openedLocked counts the sockets opened on workers' requests.
func (r *Registry) openedLocked() int {
	n := 0
	for _, s := range r.sockets {
		if !s.persistent {
			n++
		}
	}
	return n
}

// Preopen opens the socket of a --listen spec, or takes the inherited
// socket it names, and keeps it for the registry's life; every worker gets
// it as a LISTEN_FDS descriptor, in the order of the Preopen calls. The
// master binds it itself, with its own rights: this is how the operator
// hands workers what their account could not open. A unix socket's mode is
// set through the binding thread's umask, so the file is born with it, and
// the file is given to the workers' account without following symlinks. A
// socket opened on port 0 is registered under the port it got, so that a
// worker's Listen on that address shares it. Errors name the spec.
func (r *Registry) Preopen(ls ListenSpec) (*Socket, error) {
	s, err := r.preopen(ls)
	if err != nil {
		return nil, err
	}
	if s.Name == "" {
		s.Name = "unknown"
	}
	r.mu.Lock()
	r.preopened = append(r.preopened, s)
	r.changedLocked()
	r.mu.Unlock()
	return s, nil
}

// changedLocked calls Options.Changed. Called with r.mu held.
func (r *Registry) changedLocked() {
	if r.opt.Changed != nil {
		r.opt.Changed()
	}
}

func (r *Registry) preopen(ls ListenSpec) (*Socket, error) {
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
			if (ls.FD >= 0 && s.Key.Address == strconv.Itoa(ls.FD)) || (ls.FDName != "" && s.Name == ls.FDName) {
				found = s
			}
		}
		switch {
		case found == nil && ls.FD >= 0:
			return nil, fmt.Errorf("--listen %q: the master has no inherited socket on fd %d", ls.Spec, ls.FD)
		case found == nil:
			sort.Strings(names)
			return nil, fmt.Errorf("--listen %q: no inherited socket is named %q (LISTEN_FDNAMES gave: %s)", ls.Spec, ls.FDName, strings.Join(names, ", "))
		case found.preopened:
			return nil, fmt.Errorf("--listen %q: that socket is listed twice", ls.Spec)
		}
		found.preopened = true
		if ls.Name != "" {
			found.Name = ls.Name
		}
		return found, nil
	}
	k, err := handoff.Normalize(&handoff.ListenRequest{Network: ls.Network, Address: ls.Address, Packet: ls.packet()})
	if err != nil {
		return nil, fmt.Errorf("--listen %q: %w", ls.Spec, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if s := r.sockets[k]; s != nil && s.fromStore && !s.persistent {
		// Workers asked for this address before the restart; now a
		// --listen flag declares it: the same socket serves both.
		s.persistent, s.preopened, s.Name, s.spec = true, true, ls.Name, k
		return s, nil
	}
	if r.sockets[k] != nil {
		return nil, fmt.Errorf("--listen %q: that socket is listed twice", ls.Spec)
	}
	spec := k
	if s := r.claimStoredLocked(k, len(r.preopened)); s != nil {
		// The socket outlived the previous master in systemd's fd store:
		// binding again would fail (it is still bound) or lose its queue.
		if k.Port() == 0 && !strings.HasPrefix(k.Network, "unix") {
			if _, port, err := net.SplitHostPort(s.Addr); err == nil {
				n, _ := strconv.Atoi(port)
				k.Address = k.WithPort(n)
			}
		}
		if r.sockets[k] != nil {
			s.close(false)
			return nil, fmt.Errorf("--listen %q: that socket is listed twice", ls.Spec)
		}
		s.Key, s.persistent, s.preopened, s.Name = k, true, true, ls.Name
		r.sockets[k] = s
		return s, nil
	}
	var s *Socket
	if strings.HasPrefix(k.Network, "unix") {
		umask := -1
		if ls.Mode != 0 {
			umask = int(0o777 &^ ls.Mode)
		}
		s, err = r.openUnixAsMaster(k, umask)
	} else {
		s, err = openSocket(k, 0, false, nil) // with the master's own rights
	}
	if err != nil {
		return nil, fmt.Errorf("--listen %q: %w", ls.Spec, err)
	}
	if k.Port() == 0 && !strings.HasPrefix(k.Network, "unix") {
		// Registered under the port it got, so that a worker's Listen on
		// that address shares it.
		if _, port, err := net.SplitHostPort(s.Addr); err == nil {
			n, _ := strconv.Atoi(port)
			k.Address = k.WithPort(n)
			s.Key = k
		}
	}
	if r.sockets[k] != nil {
		s.close(true)
		return nil, fmt.Errorf("--listen %q: that socket is listed twice", ls.Spec)
	}
	s.persistent, s.preopened, s.Name, s.spec = true, true, ls.Name, spec
	r.sockets[k] = s
	return s, nil
}

// Preopened returns the --listen sockets in LISTEN_FDS order.
func (r *Registry) Preopened() []*Socket {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*Socket(nil), r.preopened...)
}

// Adopt registers an inherited socket under the key fd:in.Number. The
// registry takes ownership of in.FD, marks it close-on-exec and
// non-blocking (systemd and shells hand sockets over blocking, and a
// worker blocked in accept on a shared socket cannot stop), and keeps it
// for its life.
func (r *Registry) Adopt(in Inherited) (*Socket, error) {
	fd := in.FD
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return nil, fmt.Errorf("adopt fd %d: %w", fd, err)
	}
	dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return nil, fmt.Errorf("adopt fd %d: %w", fd, err)
	}
	unix.CloseOnExec(fd)
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("adopt fd %d: set non-blocking: %w", fd, err)
	}
	s := &Socket{
		Key:        handoff.Key{Network: "fd", Address: strconv.Itoa(in.Number)},
		Name:       in.Name,
		fd:         fd,
		persistent: true,
		packet:     typ == unix.SOCK_DGRAM,
	}
	s.Network, s.Addr = describe(fd, dom, typ)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sockets[s.Key] != nil {
		return nil, fmt.Errorf("adopt fd %d: already adopted", in.Number)
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

// Collect closes every socket opened on workers' requests for which inUse
// reports false, and forgets the port-0 assignments no socket uses any
// more (a later request binds a new port), so that a worker asking for ever
// new addresses cannot grow the registry. The unix socket files of the
// sockets it closes are removed in the background: a path that hangs must
// not hold up the master, and a file is removed only while it is still the
// one the registry created. inUse runs with the registry locked.
func (r *Registry) Collect(inUse func(handoff.Key) bool) []*Socket {
	r.mu.Lock()
	defer r.mu.Unlock()
	var gone []*Socket
	for k, s := range r.sockets {
		if s.persistent || inUse(k) {
			continue
		}
		delete(r.sockets, k)
		s.close(false)
		r.removeLater(s)
		gone = append(gone, s)
	}
	if len(gone) > 0 {
		r.changedLocked()
		used := map[handoff.Key]bool{}
		for k := range r.sockets {
			used[k.Shared()] = true
		}
		for k := range r.opening {
			used[k.Shared()] = true
		}
		for pk := range r.ports {
			if !used[pk] {
				delete(r.ports, pk)
			}
		}
	}
	return gone
}

// removeLater removes s's socket file in the background.
func (r *Registry) removeLater(s *Socket) {
	if s.path == "" {
		return
	}
	r.removing.Add(1)
	go func() {
		defer r.removing.Done()
		removeSocketFile(s.path, s.ino, s.owner)
	}()
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
// socket files the registry created (a final stop), waiting at most 5 s
// for them; without, the files stay for a successor that holds the same
// sockets. Acquire fails afterwards. Close is idempotent.
func (r *Registry) Close(removeFiles bool) {
	r.mu.Lock()
	for k, s := range r.sockets {
		s.close(false)
		if removeFiles {
			r.removeLater(s)
		}
		delete(r.sockets, k)
	}
	for _, s := range r.unclaimed {
		s.close(false)
	}
	r.preopened, r.unclaimed = nil, nil
	r.closed = true
	r.mu.Unlock()
	done := make(chan struct{})
	go func() { r.removing.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
	}
}

func (s *Socket) close(removeFile bool) {
	unix.Close(s.fd)
	s.fd = -1
	if removeFile && s.path != "" {
		removeSocketFile(s.path, s.ino, s.owner)
	}
}

func errnoOf(err error) syscall.Errno {
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	return 0
}

// Len returns the number of sockets the registry holds. Like every
// method, it waits for the registry's lock: the watchdog uses it to prove
// the registry is not stuck.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.sockets)
}

// Member is one socket of a reuseport group, for Members.
type Member struct {
	// Key is the member's key (its Member field names the slot).
	Key handoff.Key
	// FD is the registry's descriptor of the socket, open while the
	// callback runs.
	FD int
}

// Members calls f once, under the registry's lock (so that every
// descriptor stays open while f runs), with every reuseport group by name
// (the shared key's string) and its member sockets in slot order.
func (r *Registry) Members(f func(groups map[string][]Member)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	groups := map[string][]Member{}
	for k, s := range r.sockets {
		if k.Member == 0 {
			continue
		}
		name := k.Shared().String()
		groups[name] = append(groups[name], Member{Key: k, FD: s.fd})
	}
	for _, ms := range groups {
		sort.Slice(ms, func(i, j int) bool { return ms[i].Key.Member < ms[j].Key.Member })
	}
	f(groups)
}
