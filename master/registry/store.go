package registry

import (
	"fmt"
	"net"
	"net/url"
	"sort"
	"strconv"
	"strings"

	"github.com/gorolling/gorolling/handoff"
	"golang.org/x/sys/unix"
)

// Sockets kept in systemd's file descriptor store are named by what the
// registry needs to take them back under the same key after the master
// died: a name is "gr1;" and URL query fields (systemd allows printable
// ASCII without ':' in a name, which query escaping gives):
//
//	k  "s" for a socket opened on workers' requests, "l" for --listen
//	n  the key's network; a its address (for --listen: the address as
//	   the spec gave it, port 0 included); p "1" for a datagram socket;
//	   i the request index; m the reuseport member
//	x  for --listen: the spec's position
//	f, o  the unix socket file the registry created, and its inode, so
//	   that the final stop still removes it (and only it)
//
// The port a port-0 socket got is the socket's own, read back from it.
const storePrefix = "gr1;"

// IsStoreName reports whether a LISTEN_FDNAMES name is one of ours.
func IsStoreName(name string) bool { return strings.HasPrefix(name, storePrefix) }

// storeName returns the fd store name of s, "" for a socket that is not
// kept: an inherited socket comes back from whoever passed it (systemd
// passes its socket units' sockets to every start).
func (s *Socket) storeName(preIndex int) string {
	if s.Key.Network == "fd" {
		return ""
	}
	k := s.Key
	v := url.Values{}
	if s.preopened {
		k = s.spec
		v.Set("k", "l")
		v.Set("x", strconv.Itoa(preIndex))
	} else {
		v.Set("k", "s")
	}
	v.Set("n", k.Network)
	v.Set("a", k.Address)
	if k.Packet {
		v.Set("p", "1")
	}
	if k.Index != 0 {
		v.Set("i", strconv.Itoa(k.Index))
	}
	if k.Member != 0 {
		v.Set("m", strconv.Itoa(k.Member))
	}
	if s.path != "" {
		v.Set("f", s.path)
		v.Set("o", strconv.FormatUint(s.ino, 10))
	}
	return storePrefix + v.Encode()
}

// storedSocket is a store name decoded.
type storedSocket struct {
	listen   bool
	key      handoff.Key
	preIndex int
	path     string
	ino      uint64
}

func parseStoreName(name string) (storedSocket, error) {
	rest, ok := strings.CutPrefix(name, storePrefix)
	if !ok {
		return storedSocket{}, fmt.Errorf("not a gorolling fd store name")
	}
	v, err := url.ParseQuery(rest)
	if err != nil {
		return storedSocket{}, err
	}
	var ss storedSocket
	switch v.Get("k") {
	case "s":
	case "l":
		ss.listen = true
	default:
		return storedSocket{}, fmt.Errorf("unknown kind %q", v.Get("k"))
	}
	num := func(f string) int {
		n, e := strconv.Atoi(v.Get(f))
		if v.Get(f) != "" && (e != nil || n < 0) && err == nil {
			err = fmt.Errorf("field %s: %q is not a count", f, v.Get(f))
		}
		return n
	}
	ss.key = handoff.Key{Network: v.Get("n"), Address: v.Get("a"), Packet: v.Get("p") == "1", Index: num("i"), Member: num("m")}
	ss.preIndex = num("x")
	ss.path = v.Get("f")
	if o := v.Get("o"); o != "" {
		ss.ino, _ = strconv.ParseUint(o, 10, 64)
	}
	if err != nil {
		return storedSocket{}, err
	}
	if ss.key.Network == "" || ss.key.Network == "fd" || ss.key.Address == "" {
		return storedSocket{}, fmt.Errorf("no usable key")
	}
	return ss, nil
}

// StoreEntry is one socket to keep in the fd store: its name, and a
// duplicate of its descriptor that the caller closes.
type StoreEntry struct {
	Name string
	FD   int
}

// StoreEntries returns the sockets to keep in systemd's fd store, with
// duplicates of their descriptors, which the caller closes: every socket
// but the inherited ones, which come back from whoever passed them.
func (r *Registry) StoreEntries() ([]StoreEntry, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pre := map[*Socket]int{}
	for i, s := range r.preopened {
		pre[s] = i
	}
	var out []StoreEntry
	for _, s := range r.sockets {
		name := s.storeName(pre[s])
		if name == "" {
			continue
		}
		d, err := unix.FcntlInt(uintptr(s.fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			for _, e := range out {
				unix.Close(e.FD)
			}
			return nil, fmt.Errorf("fd store: dup socket %s: %w", s.Key, err)
		}
		out = append(out, StoreEntry{Name: name, FD: d})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// AdoptStored takes back a socket that systemd's fd store kept while the
// master was down (in.Name is its store name): under its old key, so that
// workers asking for it get it and a port-0 request gets the same port. A
// socket of workers' requests is collected as usual once the generation
// serves and no worker asked for it again; a --listen socket waits for
// Preopen to claim it, and ReleaseUnclaimed closes it if none does. The
// registry owns in.FD from the call on, whatever it returns.
func (r *Registry) AdoptStored(in Inherited) (*Socket, error) {
	ss, err := parseStoreName(in.Name)
	if err != nil {
		unix.Close(in.FD)
		return nil, fmt.Errorf("fd store socket %q: %w", in.Name, err)
	}
	fd := in.FD
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err == nil {
		err = handoff.CheckListener(fd, ss.key.Packet)
	}
	if err == nil {
		err = r.checkStored(fd, ss)
	}
	if err == nil {
		err = unix.SetNonblock(fd, true)
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("fd store socket %q: %w", in.Name, err)
	}
	unix.CloseOnExec(fd)
	dom, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	s := &Socket{Key: ss.key, fd: fd, packet: ss.key.Packet, path: ss.path, ino: ss.ino, fromStore: true}
	s.Network, s.Addr = describe(fd, dom, typ)
	r.mu.Lock()
	defer r.mu.Unlock()
	if ss.listen {
		s.spec, s.storeIndex = ss.key, ss.preIndex
		r.unclaimed = append(r.unclaimed, s)
		return s, nil
	}
	if r.sockets[s.Key] != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("fd store socket %q: its key %s is taken already", in.Name, s.Key)
	}
	if s.path != "" {
		s.owner = r.opt.Owner // opened for the workers: theirs to remove
	}
	r.sockets[s.Key] = s
	if s.Key.Port() == 0 && !strings.HasPrefix(s.Key.Network, "unix") {
		if _, p, err := net.SplitHostPort(s.Addr); err == nil {
			r.ports[s.Key.Shared()], _ = strconv.Atoi(p)
		}
	}
	return s, nil
}

// checkStored refuses a stored socket that would not serve its key any
// more. A unix socket whose file the last master removed (it stopped after
// a failed start, and systemd restarted it with the store kept) would take
// no connection: binding again makes a new file. A reuseport member with
// --reuseport now off, or a plain TCP socket with it now on, would make
// the new sockets' binds fail with EADDRINUSE. And a socket must be bound
// where its name says (names come from the service manager, which believes
// only the main process; the check costs nothing).
func (r *Registry) checkStored(fd int, ss storedSocket) error {
	if ss.path != "" {
		var st unix.Stat_t
		if err := unix.Lstat(ss.path, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFSOCK || st.Ino != ss.ino {
			return fmt.Errorf("its socket file %s is gone or is another file now; it is bound again on request", ss.path)
		}
	}
	tcp := strings.HasPrefix(ss.key.Network, "tcp") && !ss.key.Packet
	if !ss.listen && tcp && (ss.key.Member != 0) != r.opt.ReusePort {
		return fmt.Errorf("it was opened with --reuseport %v; it is bound again on request", ss.key.Member != 0)
	}
	if port := ss.key.Port(); port != 0 {
		sa, err := unix.Getsockname(fd)
		if err != nil {
			return err
		}
		got := 0
		switch a := sa.(type) {
		case *unix.SockaddrInet4:
			got = a.Port
		case *unix.SockaddrInet6:
			got = a.Port
		}
		if got != port {
			return fmt.Errorf("the socket is bound to port %d, its name says %d", got, port)
		}
	}
	return nil
}

// ReleaseUnlisted closes, before any --listen socket is bound, the stored
// --listen sockets whose spec is none of specs (the operator changed the
// flags before the restart): a changed flag could otherwise find its
// address still bound by the socket it replaces. It returns them.
func (r *Registry) ReleaseUnlisted(specs []ListenSpec) []*Socket {
	want := map[handoff.Key]bool{}
	for _, ls := range specs {
		if ls.Network == "fd" {
			continue
		}
		if k, err := handoff.Normalize(&handoff.ListenRequest{Network: ls.Network, Address: ls.Address, Packet: ls.packet()}); err == nil {
			want[k] = true
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var gone, keep []*Socket
	for _, s := range r.unclaimed {
		if want[s.spec] {
			keep = append(keep, s)
			continue
		}
		s.close(false)
		gone = append(gone, s)
	}
	r.unclaimed = keep
	return gone
}

// claimStoredLocked returns the stored --listen socket for the spec key k at
// position idx, preferring one stored at the same position; nil if none.
// Called with r.mu held.
func (r *Registry) claimStoredLocked(k handoff.Key, idx int) *Socket {
	best := -1
	for i, s := range r.unclaimed {
		if s.spec != k {
			continue
		}
		if best < 0 || s.storeIndex == idx {
			best = i
		}
	}
	if best < 0 {
		return nil
	}
	s := r.unclaimed[best]
	r.unclaimed = append(r.unclaimed[:best], r.unclaimed[best+1:]...)
	return s
}

// ReleaseUnclaimed closes the stored --listen sockets no Preopen claimed
// (the operator removed the --listen flag before the restart), and
// returns them. Their socket files stay: nothing says they are the same
// files any more.
func (r *Registry) ReleaseUnclaimed() []*Socket {
	r.mu.Lock()
	defer r.mu.Unlock()
	gone := r.unclaimed
	r.unclaimed = nil
	for _, s := range gone {
		s.close(false)
	}
	return gone
}
