package handoff

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Key identifies one socket in the master's registry. Two listen requests
// with equal keys share one socket. Keys are comparable.
type Key struct {
	// Network is the canonical network: "tcp" (dual-stack wildcard),
	// "tcp4", "tcp6", the same for udp, "unix", "unixpacket", "unixgram",
	// or "fd" for the master's inherited descriptors.
	Network string
	// Address is the canonical address as net.Listen takes it for Network
	// (":8080" for the dual-stack wildcard, "127.0.0.1:0", "/run/x.sock",
	// or the decimal fd number). Port 0 stays 0: the key names the request,
	// not the port the kernel picked.
	Address string
	// Packet is true for datagram sockets.
	Packet bool
	// Index is the request's per-worker index (always 0 for fd keys).
	Index int
	// Member, when non-zero, names one socket of a per-slot SO_REUSEPORT
	// group: the socket of slot Member-1. Requests normalise with Member
	// 0; a master in reuseport mode sets it.
	Member int `json:",omitempty"`
}

// String renders the key for logs and status output.
func (k Key) String() string {
	s := k.Network + ":" + k.Address
	if k.Packet && k.Network == "fd" {
		s += "/packet"
	}
	if k.Index != 0 {
		s += "#" + strconv.Itoa(k.Index)
	}
	if k.Member != 0 {
		s += "@slot" + strconv.Itoa(k.Member-1)
	}
	return s
}

// IndexKey is the key with Index zero: the group of requests among which a
// worker counts its index.
func (k Key) IndexKey() Key {
	k.Index = 0
	return k
}

// Shared is the key with Member zero: the request as workers make it.
func (k Key) Shared() Key {
	k.Member = 0
	return k
}

// Port returns the port of an internet key, or 0.
func (k Key) Port() int {
	if k.Network == "fd" || strings.HasPrefix(k.Network, "unix") {
		return 0
	}
	_, p, err := net.SplitHostPort(k.Address)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(p)
	return n
}

// WithPort returns the key's address with its port replaced; used to re-bind
// a port-0 key to the port it was first given.
func (k Key) WithPort(port int) string {
	h, _, err := net.SplitHostPort(k.Address)
	if err != nil {
		return k.Address
	}
	return net.JoinHostPort(h, strconv.Itoa(port))
}

// ErrAddress reports a listen address that cannot be used as given; it wraps
// the underlying parse or resolve error.
var ErrAddress = errors.New("handoff: bad listen address")

// Normalize turns a listen request into the key of the socket it means.
// Equivalent spellings give equal keys: ":8080" and "0.0.0.0:8080" on
// "tcp" (Go binds both dual-stack), "tcp" with an IPv4 literal and "tcp4",
// a host name and the address Go would listen on for it, a service name
// and its port. Host names are resolved with the system resolver, so
// Normalize may block on DNS.
//
// Unix addresses must be absolute paths or start with '@' (the Linux
// abstract namespace); paths are cleaned.
func Normalize(r *ListenRequest) (Key, error) {
	if r.FD != nil {
		if *r.FD < 0 {
			return Key{}, fmt.Errorf("%w: negative fd %d", ErrAddress, *r.FD)
		}
		return Key{Network: "fd", Address: strconv.Itoa(*r.FD), Packet: r.Packet}, nil
	}
	base, err := networkKind(r.Network, r.Packet)
	if err != nil {
		return Key{}, err
	}
	if r.Index < 0 || r.Index > MaxIndex {
		return Key{}, fmt.Errorf("%w: index %d out of range", ErrAddress, r.Index)
	}
	k := Key{Packet: r.Packet, Index: r.Index}
	if base == "unix" {
		p := r.Address
		switch {
		case p == "":
			return Key{}, fmt.Errorf("%w: empty unix socket path", ErrAddress)
		case strings.HasPrefix(p, "@"):
		case filepath.IsAbs(p):
			p = filepath.Clean(p)
		default:
			return Key{}, fmt.Errorf("%w: unix socket path %q is not absolute", ErrAddress, p)
		}
		k.Network, k.Address = r.Network, p
		return k, nil
	}
	var ip net.IP
	var zone string
	var port int
	if base == "tcp" {
		a, err := net.ResolveTCPAddr(r.Network, r.Address)
		if err != nil {
			return Key{}, fmt.Errorf("%w: %w", ErrAddress, err)
		}
		ip, zone, port = a.IP, a.Zone, a.Port
	} else {
		a, err := net.ResolveUDPAddr(r.Network, r.Address)
		if err != nil {
			return Key{}, fmt.Errorf("%w: %w", ErrAddress, err)
		}
		ip, zone, port = a.IP, a.Zone, a.Port
	}
	k.Network, k.Address = canonicalInet(base, r.Network, ip, zone, port)
	return k, nil
}

// canonicalInet mirrors how Go's net.Listen picks a socket family for a
// (network, ip) pair, so that requests Go would bind identically get the
// same key.
func canonicalInet(base, network string, ip net.IP, zone string, port int) (string, string) {
	ps := strconv.Itoa(port)
	suffix := network[len(network)-1]
	raw, _ := netip.AddrFromSlice(ip)
	addr := raw.Unmap()
	switch {
	case suffix == '4':
		if !addr.IsValid() {
			addr = netip.IPv4Unspecified()
		}
		return base + "4", net.JoinHostPort(addr.String(), ps)
	case suffix == '6':
		addr = raw
		if !addr.IsValid() {
			addr = netip.IPv6Unspecified()
		}
		if zone != "" {
			addr = addr.WithZone(zone)
		}
		return base + "6", net.JoinHostPort(addr.String(), ps)
	case !addr.IsValid() || addr.IsUnspecified():
		// Go binds the wildcard on "tcp"/"udp" as a dual-stack socket.
		return base, ":" + ps
	case addr.Is4():
		return base + "4", net.JoinHostPort(addr.String(), ps)
	default:
		if zone != "" {
			addr = addr.WithZone(zone)
		}
		return base + "6", net.JoinHostPort(addr.String(), ps)
	}
}

// ErrnoName returns the symbolic name ("EADDRINUSE") of the first
// syscall.Errno in err's chain, or "" if there is none.
func ErrnoName(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return unix.ErrnoName(errno)
	}
	return ""
}

var errnoByName = func() map[string]syscall.Errno {
	m := make(map[string]syscall.Errno)
	for e := syscall.Errno(1); e < 4096; e++ {
		if n := unix.ErrnoName(e); n != "" {
			m[n] = e
		}
	}
	return m
}()

// ErrnoValue maps a symbolic errno name back to its value on this platform.
func ErrnoValue(name string) (syscall.Errno, bool) {
	e, ok := errnoByName[name]
	return e, ok
}
