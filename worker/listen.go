package worker

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
)

// ListenError is a listen the master could not satisfy. When the master's
// bind failed it carries the real errno, so errors.Is(err,
// syscall.EADDRINUSE) works as it does with net.Listen.
type ListenError struct {
	// Network and Address are what the worker asked for.
	Network, Address string
	// Errno is the failure's errno, or 0 if it had none.
	Errno syscall.Errno
	// Msg is the master's description of the failure.
	Msg string
}

// Error returns the master's description, prefixed with "gorolling: ".
func (e *ListenError) Error() string { return "gorolling: " + e.Msg }

// Unwrap returns the errno, if any.
func (e *ListenError) Unwrap() error {
	if e.Errno == 0 {
		return nil
	}
	return e.Errno
}

// ListenConfig holds listen options, like net.ListenConfig.
//
// The zero value asks the master for a shared socket (Node's cluster
// semantics); outside gorolling it behaves like net.ListenConfig.
type ListenConfig struct {
	// Exclusive makes the worker bind the socket itself, as Node's
	// listen({exclusive: true}): nothing is shared, the master is not
	// asked, and each worker gets a socket of its own.
	Exclusive bool
	// Net is used when the worker binds itself: for Exclusive listens and
	// outside gorolling. Its Control function does not run on sockets the
	// master opens.
	Net net.ListenConfig
}

// Listen announces on the local network address, like net.Listen.
//
// Under gorolling the master opens the socket on the first request for it
// and hands every worker, in this and every later generation, a duplicate:
// all workers accept from one queue, which survives upgrades. The k-th
// listen on a port-0 address gets the same port in every worker. Outside
// gorolling it is net.Listen, except that a socket inherited through
// systemd socket activation (LISTEN_FDS) bound to the same address is used
// instead of binding a new one.
//
// Closing the returned listener closes this worker's copy only; the
// master's copy keeps the socket and its queued connections.
func Listen(network, address string) (net.Listener, error) {
	var lc ListenConfig
	return lc.Listen(context.Background(), network, address)
}

// ListenPacket is Listen for datagram networks (udp, udp4, udp6,
// unixgram), like net.ListenPacket. A shared UDP socket delivers each
// datagram to one of the workers; there is no balancing.
func ListenPacket(network, address string) (net.PacketConn, error) {
	var lc ListenConfig
	return lc.ListenPacket(context.Background(), network, address)
}

// ListenFD returns a listener for the master's inherited descriptor n
// (Node's listen({fd: n})): a socket the master got from systemd or a
// shell redirect. Outside gorolling it wraps this process's own fd n; the
// listener then owns n. It fails with a clear error if there is no such
// descriptor or it is not a listening socket.
func ListenFD(n int) (net.Listener, error) {
	c, err := getClient()
	if err != nil {
		return nil, err
	}
	if c == nil {
		x, err := ownFD(n, false)
		if err != nil {
			return nil, err
		}
		return x.(net.Listener), nil
	}
	return c.listenFD(context.Background(), n, false)
}

// ListenPacketFD is ListenFD for a datagram socket.
func ListenPacketFD(n int) (net.PacketConn, error) {
	c, err := getClient()
	if err != nil {
		return nil, err
	}
	if c == nil {
		pc, err := ownFD(n, true)
		if err != nil {
			return nil, err
		}
		return pc.(net.PacketConn), nil
	}
	l, err := c.listenFD(context.Background(), n, true)
	if err != nil {
		return nil, err
	}
	return l.(net.PacketConn), nil
}

// Listen is the net.ListenConfig.Listen of this package; see Listen.
func (lc *ListenConfig) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	c, err := getClient()
	if err != nil {
		return nil, err
	}
	if c == nil {
		return lc.standaloneListen(ctx, network, address)
	}
	if lc.Exclusive {
		return lc.Net.Listen(ctx, network, address)
	}
	if network == "unixgram" || strings.HasPrefix(network, "udp") {
		return nil, &net.OpError{Op: "listen", Net: network, Err: net.UnknownNetworkError(network)}
	}
	x, err := c.listen(ctx, network, address, false)
	if err != nil {
		return nil, err
	}
	return x.(net.Listener), nil
}

// ListenPacket is the net.ListenConfig.ListenPacket of this package; see
// ListenPacket.
func (lc *ListenConfig) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	c, err := getClient()
	if err != nil {
		return nil, err
	}
	if c == nil {
		return lc.standaloneListenPacket(ctx, network, address)
	}
	if lc.Exclusive {
		return lc.Net.ListenPacket(ctx, network, address)
	}
	if network != "unixgram" && !strings.HasPrefix(network, "udp") {
		return nil, &net.OpError{Op: "listen", Net: network, Err: net.UnknownNetworkError(network)}
	}
	x, err := c.listen(ctx, network, address, true)
	if err != nil {
		return nil, err
	}
	return x.(net.PacketConn), nil
}

// reservedConn marks an index reserved by a listen still in flight.
type reservedConn struct{}

func (reservedConn) SyscallConn() (syscall.RawConn, error) { return nil, nil }

// alive reports whether a listener this package returned is still open.
func alive(x syscall.Conn) bool {
	if _, ok := x.(reservedConn); ok {
		return true
	}
	rc, err := x.SyscallConn()
	if err != nil {
		return false
	}
	return rc.Control(func(uintptr) {}) == nil
}

// reserve picks the lowest index of ik that this worker does not hold:
// Node's per-worker index, which gives the k-th port-0 listen of every
// worker the same socket. A closed listener frees its index.
func (c *client) reserve(ik handoff.Key) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	h := c.held[ik]
	for i, x := range h {
		if x == nil || !alive(x) {
			h[i] = reservedConn{}
			return i
		}
	}
	c.held[ik] = append(h, reservedConn{})
	return len(h)
}

func (c *client) settle(ik handoff.Key, i int, x syscall.Conn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.held[ik][i] = x
}

func (c *client) listen(ctx context.Context, network, address string, packet bool) (syscall.Conn, error) {
	req := &handoff.ListenRequest{Network: network, Address: address, Packet: packet}
	if strings.HasPrefix(network, "unix") && !strings.HasPrefix(address, "@") && address != "" && !filepath.IsAbs(address) {
		// Like Node's path.resolve in the child: relative to this
		// worker's working directory.
		abs, err := filepath.Abs(address)
		if err != nil {
			return nil, &net.OpError{Op: "listen", Net: network, Err: err}
		}
		req.Address = abs
	}
	k, err := handoff.Normalize(req)
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Err: err}
	}
	ik := k.IndexKey()
	idx := c.reserve(ik)
	req.Index = idx
	x, err := c.ask(ctx, req, network, address)
	c.settle(ik, idx, x)
	if err != nil {
		return nil, err
	}
	return x, nil
}

func (c *client) listenFD(ctx context.Context, n int, packet bool) (net.Listener, error) {
	req := &handoff.ListenRequest{FD: &n, Packet: packet}
	x, err := c.ask(ctx, req, "fd", strconv.Itoa(n))
	if err != nil {
		return nil, err
	}
	if l, ok := x.(net.Listener); ok {
		return l, nil
	}
	return pconnListener{x.(net.PacketConn)}, nil
}

// pconnListener carries a PacketConn through listenFD's return type; only
// ListenPacketFD unwraps it.
type pconnListener struct{ net.PacketConn }

func (pconnListener) Accept() (net.Conn, error) { return nil, errors.ErrUnsupported }
func (p pconnListener) Addr() net.Addr          { return p.LocalAddr() }

// ask sends a listen request and turns the reply into a listener or packet
// conn. The result is nil (an untyped nil interface) on error.
func (c *client) ask(ctx context.Context, req *handoff.ListenRequest, network, address string) (syscall.Conn, error) {
	r, err := c.request(ctx, &handoff.Message{Type: handoff.TypeListen, Listen: req})
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Err: err}
	}
	if r.msg.Error != "" || r.msg.Errno != "" {
		closeFDs(r.fds)
		e := &ListenError{Network: network, Address: address, Msg: r.msg.Error}
		if v, ok := handoff.ErrnoValue(r.msg.Errno); ok {
			e.Errno = v
		}
		if e.Msg == "" {
			e.Msg = "listen " + network + " " + address + ": " + r.msg.Errno
		}
		return nil, e
	}
	if len(r.fds) != 1 {
		closeFDs(r.fds)
		return nil, &net.OpError{Op: "listen", Net: network, Err: fmt.Errorf("gorolling: master replied with %d fds, want 1", len(r.fds))}
	}
	x, err := wrapFD(r.fds[0], req.Packet, "gorolling:"+network+":"+address)
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: network, Err: err}
	}
	return x, nil
}

// wrapFD turns a received socket into a listener or packet conn. It always
// consumes fd: net duplicates it, and the original is closed at once
// (PITFALLS #8: a kept *os.File would keep the socket open).
func wrapFD(fd int, packet bool, name string) (syscall.Conn, error) {
	// os.NewFile on a received descriptor does not remember having set
	// O_NONBLOCK, so the Fd() call inside net.FileListener leaves the
	// shared socket non-blocking (PITFALLS #7).
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	if packet {
		pc, err := net.FilePacketConn(f)
		if err != nil {
			return nil, err
		}
		return pc.(syscall.Conn), nil
	}
	l, err := net.FileListener(f)
	if err != nil {
		return nil, err
	}
	return l.(syscall.Conn), nil
}

// ownFD wraps this process's own descriptor n (outside gorolling).
func ownFD(n int, packet bool) (any, error) {
	if n < 0 {
		return nil, fmt.Errorf("gorolling: listen fd:%d: negative descriptor", n)
	}
	typ, err := syscall.GetsockoptInt(n, syscall.SOL_SOCKET, syscall.SO_TYPE)
	if err != nil {
		return nil, &net.OpError{Op: "listen", Net: "fd", Err: fmt.Errorf("fd %d is not a socket: %w", n, err)}
	}
	if (typ == syscall.SOCK_DGRAM) != packet {
		if packet {
			return nil, &net.OpError{Op: "listen", Net: "fd", Err: fmt.Errorf("fd %d is a stream socket: use ListenFD: %w", n, syscall.EPROTOTYPE)}
		}
		return nil, &net.OpError{Op: "listen", Net: "fd", Err: fmt.Errorf("fd %d is a datagram socket: use ListenPacketFD: %w", n, syscall.EPROTOTYPE)}
	}
	if !packet {
		acc, err := syscall.GetsockoptInt(n, syscall.SOL_SOCKET, syscall.SO_ACCEPTCONN)
		if err == nil && acc == 0 {
			return nil, &net.OpError{Op: "listen", Net: "fd", Err: fmt.Errorf("fd %d is a socket that is not listening: %w", n, syscall.EINVAL)}
		}
	}
	syscall.CloseOnExec(n)
	markActivatedUsed(n)
	return wrapFD(n, packet, "fd:"+strconv.Itoa(n))
}
