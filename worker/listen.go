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

// ListenError is the Err of a *net.OpError for a listen the master could
// not satisfy. When the master's bind failed it carries the real errno, so
// errors.Is(err, syscall.EADDRINUSE) works as it does with net.Listen.
type ListenError struct {
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

// opError wraps err as a listen failure of network and address. err
// unwraps to an errno wherever one applies.
func opError(network, address string, err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) {
		return oe
	}
	return &net.OpError{Op: "listen", Net: network, Addr: addr(network, address), Err: err}
}

// listenAddr is the address asked for, as a net.Addr for an OpError.
type listenAddr struct{ network, address string }

func (a listenAddr) Network() string { return a.network }
func (a listenAddr) String() string  { return a.address }

func addr(network, address string) net.Addr {
	if address == "" {
		return nil
	}
	return listenAddr{network, address}
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
// master's copy keeps the socket and its queued connections. Every error
// is a *net.OpError whose Err unwraps to the errno where there is one.
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
	x, err := std.listenFD(context.Background(), n, false)
	if err != nil {
		return nil, err
	}
	return x.(net.Listener), nil
}

// ListenPacketFD is ListenFD for a datagram socket.
func ListenPacketFD(n int) (net.PacketConn, error) {
	x, err := std.listenFD(context.Background(), n, true)
	if err != nil {
		return nil, err
	}
	return x.(net.PacketConn), nil
}

// Listen is the net.ListenConfig.Listen of this package; see Listen.
func (lc *ListenConfig) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	x, err := std.listen(ctx, lc, network, address, false)
	if err != nil {
		return nil, err
	}
	return x.(net.Listener), nil
}

// ListenPacket is the net.ListenConfig.ListenPacket of this package; see
// ListenPacket.
func (lc *ListenConfig) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	x, err := std.listen(ctx, lc, network, address, true)
	if err != nil {
		return nil, err
	}
	return x.(net.PacketConn), nil
}

func isPacketNetwork(network string) bool {
	return network == "unixgram" || strings.HasPrefix(network, "udp")
}

// listen serves Listen and ListenPacket: a net.Listener or a
// net.PacketConn.
func (p *proc) listen(ctx context.Context, lc *ListenConfig, network, address string, packet bool) (any, error) {
	c, err := p.connect()
	if err != nil {
		return nil, opError(network, address, err)
	}
	if isPacketNetwork(network) != packet {
		return nil, opError(network, address, fmt.Errorf("%w: %w", net.UnknownNetworkError(network), syscall.EPROTOTYPE))
	}
	if c == nil || lc.Exclusive {
		if c == nil && !lc.Exclusive {
			if x, ok, err := p.listenActivated(network, address, packet); ok {
				return x, err
			}
		}
		if packet {
			return lc.Net.ListenPacket(ctx, network, address)
		}
		return lc.Net.Listen(ctx, network, address)
	}
	req := &handoff.ListenRequest{Network: network, Address: address, Packet: packet}
	if strings.HasPrefix(network, "unix") && !strings.HasPrefix(address, "@") && address != "" && !filepath.IsAbs(address) {
		// Like Node's path.resolve in the child: relative to this
		// worker's working directory.
		abs, err := filepath.Abs(address)
		if err != nil {
			return nil, opError(network, address, err)
		}
		req.Address = abs
	}
	k, err := handoff.Normalize(req)
	if err != nil {
		return nil, opError(network, address, &ListenError{Errno: syscall.EINVAL, Msg: err.Error()})
	}
	ik := k.IndexKey()
	idx := c.reserve(ik)
	req.Index = idx
	x, err := c.ask(ctx, req)
	c.settle(ik, idx, x)
	if err != nil {
		return nil, opError(network, address, err)
	}
	return x, nil
}

func (p *proc) listenFD(ctx context.Context, n int, packet bool) (any, error) {
	name := "fd:" + strconv.Itoa(n)
	c, err := p.connect()
	if err != nil {
		return nil, opError("fd", name, err)
	}
	if c == nil {
		x, err := p.ownFD(n, packet)
		if err != nil {
			return nil, opError("fd", name, err)
		}
		return x, nil
	}
	x, err := c.ask(ctx, &handoff.ListenRequest{FD: &n, Packet: packet})
	if err != nil {
		return nil, opError("fd", name, err)
	}
	return x, nil
}

// reserved marks an index reserved by a listen still in flight.
type reserved struct{}

// alive reports whether a listener this package returned is still open.
func alive(x any) bool {
	if _, ok := x.(reserved); ok {
		return true
	}
	sc, ok := x.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
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
			h[i] = reserved{}
			return i
		}
	}
	c.held[ik] = append(h, reserved{})
	return len(h)
}

func (c *client) settle(ik handoff.Key, i int, x any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.held[ik][i] = x
}

// ask sends a listen request and turns the reply into a listener or packet
// conn. The result is nil on error.
func (c *client) ask(ctx context.Context, req *handoff.ListenRequest) (any, error) {
	r, err := c.request(ctx, &handoff.Message{Type: handoff.TypeListen, Listen: req})
	if errors.Is(err, errMasterGone) {
		return nil, errMasterGone // the errno (EPIPE) a listen error carries
	}
	if err != nil {
		return nil, err
	}
	if r.msg.Error != "" || r.msg.Errno != "" {
		closeFDs(r.fds)
		// The *net.OpError this goes into names the operation and the
		// address already: keep the master's message from saying it twice.
		msg := r.msg.Error
		if strings.HasPrefix(msg, "listen ") {
			if i := strings.Index(msg, ": "); i > 0 {
				msg = msg[i+2:]
			}
		}
		e := &ListenError{Msg: msg}
		if v, ok := handoff.ErrnoValue(r.msg.Errno); ok {
			e.Errno = v
		}
		if e.Msg == "" {
			e.Msg = r.msg.Errno
		}
		return nil, e
	}
	if len(r.fds) != 1 {
		closeFDs(r.fds)
		return nil, &ListenError{Errno: syscall.EPROTO, Msg: fmt.Sprintf("the master replied with %d descriptors, want 1", len(r.fds))}
	}
	x, err := wrapFD(r.fds[0], req.Packet, "gorolling:"+r.msg.Network+":"+r.msg.Address)
	if err == nil && !req.Packet && r.msg.Key != "" {
		c.remember(r.msg.Key, x.(net.Listener).Addr())
	}
	return x, err
}

// wrapFD turns a socket descriptor into a listener or packet conn. It
// always consumes fd: net duplicates it, and the original is closed at once
// (a kept *os.File would keep the socket open after the listener closes,
// and hold a reuseport member in its group). A descriptor received over
// SCM_RIGHTS wrapped by os.NewFile does not remember having set O_NONBLOCK,
// so the Fd() inside net.FileListener leaves the shared socket non-blocking.
func wrapFD(fd int, packet bool, name string) (any, error) {
	if err := handoff.CheckListener(fd, packet); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	if packet {
		return net.FilePacketConn(f)
	}
	return net.FileListener(f)
}

// ownFD wraps this process's own descriptor n (outside gorolling).
func (p *proc) ownFD(n int, packet bool) (any, error) {
	if n < 0 {
		return nil, fmt.Errorf("negative descriptor %d: %w", n, syscall.EBADF)
	}
	if f := p.takeActivatedFD(n); f != nil {
		defer f.Close()
		if err := handoff.CheckListener(n, packet); err != nil {
			return nil, err
		}
		if packet {
			return net.FilePacketConn(f)
		}
		return net.FileListener(f)
	}
	if err := handoff.CheckListener(n, packet); err != nil {
		return nil, err
	}
	syscall.CloseOnExec(n)
	return wrapFD(n, packet, "fd:"+strconv.Itoa(n))
}
