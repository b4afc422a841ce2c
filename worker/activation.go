package worker

import (
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/gorolling/gorolling/handoff"
)

// Outside gorolling, a program started by systemd's socket activation (or
// systemd-socket-activate) gets its sockets as LISTEN_FDS. Listen then
// uses an inherited socket whose address matches the request instead of
// binding, so one binary runs standalone, under systemd socket activation,
// and under gorolling. The sockets are taken from the environment on first
// use of the package (see proc.setup).

// listenActivated serves a standalone Listen or ListenPacket from an
// inherited socket bound to what the request means. ok is false when none
// is.
func (p *proc) listenActivated(network, address string, packet bool) (any, bool, error) {
	p.actMu.Lock()
	n := len(p.activated)
	p.actMu.Unlock()
	if n == 0 {
		return nil, false, nil
	}
	k, err := handoff.Normalize(&handoff.ListenRequest{Network: network, Address: address, Packet: packet})
	if err != nil || k.Port() == 0 && !strings.HasPrefix(k.Network, "unix") {
		return nil, false, nil
	}
	f := p.takeActivated(func(fd int) bool {
		ak, ok := fdKey(fd)
		return ok && ak == k.IndexKey()
	})
	if f == nil {
		return nil, false, nil
	}
	defer f.Close()
	var x any
	if packet {
		x, err = net.FilePacketConn(f)
	} else {
		x, err = net.FileListener(f)
	}
	if err != nil {
		return nil, true, opError(network, address, err)
	}
	return x, true, nil
}

// takeActivated removes and returns the first inherited socket that match
// accepts (the caller owns it), or nil.
func (p *proc) takeActivated(match func(fd int) bool) *os.File {
	p.actMu.Lock()
	defer p.actMu.Unlock()
	for i, f := range p.activated {
		fd := -1
		if rc, err := f.SyscallConn(); err == nil {
			rc.Control(func(x uintptr) { fd = int(x) })
		}
		if fd >= 0 && match(fd) {
			p.activated = append(p.activated[:i], p.activated[i+1:]...)
			return f
		}
	}
	return nil
}

// takeActivatedFD is takeActivated for the socket on descriptor n.
func (p *proc) takeActivatedFD(n int) *os.File {
	return p.takeActivated(func(fd int) bool { return fd == n })
}

// fdKey computes the registry key of a bound socket, the same key a listen
// request for its address normalises to.
func fdKey(fd int) (handoff.Key, bool) {
	typ, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_TYPE)
	if err != nil {
		return handoff.Key{}, false
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		return handoff.Key{}, false
	}
	packet := typ == syscall.SOCK_DGRAM
	base := "tcp"
	if packet {
		base = "udp"
	}
	req := &handoff.ListenRequest{Packet: packet}
	switch a := sa.(type) {
	case *syscall.SockaddrInet4:
		req.Network, req.Address = base+"4", net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
	case *syscall.SockaddrInet6:
		ip := net.IP(a.Addr[:])
		req.Network, req.Address = base+"6", net.JoinHostPort(ip.String(), strconv.Itoa(a.Port))
		if ip.IsUnspecified() {
			if v6only, err := syscall.GetsockoptInt(fd, syscall.IPPROTO_IPV6, syscall.IPV6_V6ONLY); err == nil && v6only == 0 {
				req.Network = base // dual-stack wildcard, as Go binds ":port"
			}
		}
	case *syscall.SockaddrUnix:
		switch typ {
		case syscall.SOCK_DGRAM:
			req.Network = "unixgram"
		case syscall.SOCK_SEQPACKET:
			req.Network = "unixpacket"
		default:
			req.Network = "unix"
		}
		req.Address = a.Name
		if strings.HasPrefix(req.Address, "\x00") {
			req.Address = "@" + req.Address[1:]
		}
	default:
		return handoff.Key{}, false
	}
	k, err := handoff.Normalize(req)
	return k, err == nil
}
