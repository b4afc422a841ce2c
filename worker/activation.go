package worker

import (
	"context"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/gorolling/gorolling/handoff"
)

// Socket activation (systemd's LISTEN_FDS protocol). When the process was
// started with LISTEN_FDS and a LISTEN_PID equal to its own pid, the
// inherited sockets (fds 3..3+N-1) are marked close-on-exec at once and the
// variables are removed from the environment. Outside gorolling, Listen
// then uses an inherited socket whose address matches the request instead
// of binding, so one binary runs standalone, under systemd socket
// activation, and under gorolling.
var activation struct {
	mu    sync.Mutex
	fds   []activationFD
	names []string
}

type activationFD struct {
	fd   int
	name string
	used bool
}

func init() {
	pid, err := strconv.Atoi(os.Getenv("LISTEN_PID"))
	if err != nil || pid != os.Getpid() {
		return
	}
	n, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || n <= 0 {
		return
	}
	names := strings.Split(os.Getenv("LISTEN_FDNAMES"), ":")
	for i := 0; i < n; i++ {
		fd := 3 + i
		syscall.CloseOnExec(fd)
		a := activationFD{fd: fd, name: "unknown"}
		if i < len(names) && names[i] != "" {
			a.name = names[i]
		}
		activation.fds = append(activation.fds, a)
	}
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
}

// ActivatedFDs returns the sockets this process was given through
// LISTEN_FDS (fd numbers and LISTEN_FDNAMES names), under systemd or as
// gorolling's pre-opened listeners (--listen). Programs that prefer to pick
// their sockets by name use it with net.FileListener.
func ActivatedFDs() map[string][]int {
	activation.mu.Lock()
	defer activation.mu.Unlock()
	out := map[string][]int{}
	for _, a := range activation.fds {
		out[a.name] = append(out[a.name], a.fd)
	}
	return out
}

// takeActivated returns an unused inherited socket that is bound to what
// k means, and marks it used; -1 if none is.
func takeActivated(k handoff.Key) int {
	activation.mu.Lock()
	defer activation.mu.Unlock()
	for i := range activation.fds {
		a := &activation.fds[i]
		if a.used {
			continue
		}
		if ak, ok := fdKey(a.fd); ok && ak == k.IndexKey() {
			a.used = true
			return a.fd
		}
	}
	return -1
}

// markActivatedUsed records that fd was taken by ListenFD.
func markActivatedUsed(fd int) {
	activation.mu.Lock()
	defer activation.mu.Unlock()
	for i := range activation.fds {
		if activation.fds[i].fd == fd {
			activation.fds[i].used = true
		}
	}
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

// listenActivated serves a standalone Listen or ListenPacket from an
// inherited socket when one matches. ok is false when none does.
func listenActivated(network, address string, packet bool) (syscall.Conn, bool, error) {
	activation.mu.Lock()
	n := len(activation.fds)
	activation.mu.Unlock()
	if n == 0 {
		return nil, false, nil
	}
	req := &handoff.ListenRequest{Network: network, Address: address, Packet: packet}
	k, err := handoff.Normalize(req)
	if err != nil || k.Port() == 0 && !strings.HasPrefix(k.Network, "unix") {
		return nil, false, nil
	}
	fd := takeActivated(k)
	if fd < 0 {
		return nil, false, nil
	}
	x, err := wrapFD(fd, packet, "LISTEN_FDS:"+strconv.Itoa(fd))
	if err != nil {
		return nil, true, &net.OpError{Op: "listen", Net: network, Err: err}
	}
	return x, true, nil
}

// sdNotify sends state to $NOTIFY_SOCKET (systemd's sd_notify), if set. It
// returns nil when there is no socket to notify.
func sdNotify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if strings.HasPrefix(path, "@") {
		path = "\x00" + path[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(state))
	return err
}

// standaloneListen is Listen outside gorolling: an inherited socket that
// matches, else the net.ListenConfig.
func (lc *ListenConfig) standaloneListen(ctx context.Context, network, address string) (net.Listener, error) {
	if !lc.Exclusive {
		if x, ok, err := listenActivated(network, address, false); ok {
			if err != nil {
				return nil, err
			}
			if l, isL := x.(net.Listener); isL {
				return l, nil
			}
		}
	}
	return lc.Net.Listen(ctx, network, address)
}

func (lc *ListenConfig) standaloneListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	if !lc.Exclusive {
		if x, ok, err := listenActivated(network, address, true); ok {
			if err != nil {
				return nil, err
			}
			if pc, isPC := x.(net.PacketConn); isPC {
				return pc, nil
			}
		}
	}
	return lc.Net.ListenPacket(ctx, network, address)
}
