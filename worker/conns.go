package worker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"

	"github.com/gorolling/gorolling/handoff"
	"golang.org/x/sys/unix"
)

// Connection hand-off. A draining worker gives a connected socket to the
// master with HandOff; the master passes it to a ready worker of the
// serving generation that called Adopt for the same socket, and that
// worker's Accept returns it, its state and the bytes the first one had
// read but not processed replayed first. The client sees nothing: the
// socket, its queues and its TCP state never change hands in the kernel,
// only the processes holding a descriptor of it do.
//
// What can move: plain TCP or unix stream connections whose protocol state
// the application can write down between two messages (HTTP/1.1 between
// requests, which ServeHTTP does itself; a line protocol; a WebSocket after
// its handshake, with its own framing state). What cannot: TLS (its keys
// and sequence numbers live in the crypto/tls state of the process), and
// HTTP/2 (it keeps its GOAWAY drain).

// ErrNotHandedOver is wrapped by HandOff's error when the connection stays
// with the caller: no adopting worker took it in time, the master does not
// relay connections, or the process is not a gorolling worker. The caller
// then finishes the connection itself.
var ErrNotHandedOver = errors.New("gorolling: connection not handed over")

// ErrHandOffUnknown is wrapped by HandOff's error when the master took the
// connection's offer but gave no answer: it died, or the drain's deadline
// passed first. Another worker may be serving the connection already, so
// HandOff has closed this process's copy unread: a connection read by two
// workers could have its requests answered twice. The caller must not use
// the connection any more.
var ErrHandOffUnknown = errors.New("gorolling: the master did not say whether the connection was handed over; it was closed here")

// heldSock is a stream socket the master gave this worker: its key and
// bound address, for finding which socket a connection came from.
type heldSock struct {
	key  string
	addr net.Addr
}

// remember records the key of a listener the master gave.
func (c *client) remember(key string, a net.Addr) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, h := range c.socks {
		if h.key == key {
			return
		}
	}
	c.socks = append(c.socks, heldSock{key: key, addr: a})
}

// keyFor returns the key of the master's socket whose address local is
// (a connection's local address, or a listener's own address).
func (c *client) keyFor(local net.Addr) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, h := range c.socks {
		if sameSocketAddr(h.addr, local) {
			return h.key, true
		}
	}
	return "", false
}

// sameSocketAddr reports whether local belongs to the listener bound to
// l: the same unix path, or the same port on the listener's address or on
// any address of a wildcard listener.
func sameSocketAddr(l, local net.Addr) bool {
	switch la := l.(type) {
	case *net.TCPAddr:
		ca, ok := local.(*net.TCPAddr)
		if !ok || ca.Port != la.Port {
			return false
		}
		return la.IP.IsUnspecified() || la.IP.Equal(ca.IP)
	case *net.UnixAddr:
		ca, ok := local.(*net.UnixAddr)
		return ok && ca.Name == la.Name && ca.Name != ""
	}
	return false
}

// relays reports whether this worker can hand connections over and adopt
// them: it runs under a master that relays connections.
func (p *proc) relays() (*client, bool) {
	c, err := p.connect()
	if err != nil || c == nil {
		return nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c, c.conns && !c.broken
}

// HandOff gives c, a connection accepted from a listener of this package
// (or one Adopt returned), to a worker of the serving generation that
// adopts connections of the same socket, together with state (at most
// handoff.MaxStateSize bytes, for the adopter's Conn.State) and unread,
// the bytes the caller read from c but did not process (at most
// handoff.MaxUnreadSize), which the adopter reads before the socket's own.
//
// Call it only while draining, and only once nothing reads from c any
// more: from then on the bytes the client sends are for the adopter. On
// success c is closed (this process's copy: the connection lives on in the
// adopter) and HandOff returns nil. If it returns an error wrapping
// ErrNotHandedOver, c is untouched and the caller finishes it the old way.
// If the master took the offer and never answered (it died; or the drain's
// deadline passed first), the error wraps ErrHandOffUnknown and c is
// closed: it is the one case where a connection is lost rather than risk
// two workers serving it. The master answers within about two seconds of
// reading an offer; HandOff waits for that answer as long as the master
// lives and the drain's deadline has not passed.
func HandOff(c net.Conn, state, unread []byte) error {
	return std.handOff(c, state, unread)
}

func (p *proc) handOff(c net.Conn, state, unread []byte) error {
	if ac, ok := c.(*Conn); ok {
		// Bytes the previous worker had read, which nobody has read here
		// yet, come after the caller's.
		if rest := ac.rest(); len(rest) > 0 {
			unread = append(append([]byte(nil), unread...), rest...)
		}
	}
	key, err := p.handOffKey(c)
	if err != nil {
		return err
	}
	if err := p.handOffFD(c, key, state, unread); err != nil {
		return err
	}
	c.Close()
	return nil
}

// handOffKey returns the key of the socket c came from, or an error
// wrapping ErrNotHandedOver.
func (p *proc) handOffKey(c net.Conn) (string, error) {
	cl, ok := p.relays()
	if !ok {
		return "", fmt.Errorf("%w: the master does not relay connections (or this is not a gorolling worker)", ErrNotHandedOver)
	}
	key, ok := cl.keyFor(c.LocalAddr())
	if !ok {
		return "", fmt.Errorf("%w: %v is not an address of a socket the master gave this worker", ErrNotHandedOver, c.LocalAddr())
	}
	return key, nil
}

// handOffFD offers c's socket to the master and waits for the outcome. It
// never closes or reads c.
func (p *proc) handOffFD(c net.Conn, key string, state, unread []byte) error {
	if len(state) > handoff.MaxStateSize || len(unread) > handoff.MaxUnreadSize {
		return fmt.Errorf("%w: state of %d bytes and %d unread bytes, at most %d and %d", ErrNotHandedOver, len(state), len(unread), handoff.MaxStateSize, handoff.MaxUnreadSize)
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return fmt.Errorf("%w: %T has no descriptor", ErrNotHandedOver, c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNotHandedOver, err)
	}
	// A duplicate to send, so that nothing holds c's descriptor while the
	// master decides.
	dup := -1
	var derr error
	if err := rc.Control(func(fd uintptr) {
		dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil || derr != nil {
		return fmt.Errorf("%w: duplicate the descriptor: %v", ErrNotHandedOver, errors.Join(err, derr))
	}
	cl, ok := p.relays()
	if !ok {
		unix.Close(dup)
		return fmt.Errorf("%w: the master is gone", ErrNotHandedOver)
	}
	// No bound of its own: the master reads offers as earlier ones are
	// settled (at most 64 of a worker's at a time, each within about two
	// seconds), so a worker handing over many connections waits its turn.
	// Past the drain's deadline the worker is about to be stopped anyway.
	ctx := context.Background()
	if dl := p.drainDeadline(); !dl.IsZero() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, dl)
		defer cancel()
	}
	r, err := cl.request(ctx, &handoff.Message{Type: handoff.TypeHandoff, Key: key, State: state, Unread: unread}, dup)
	unix.Close(dup)
	if errors.Is(err, errUnanswered) {
		// The master has the offer and may have given it to another
		// worker: this copy must not be read again.
		c.Close()
		return fmt.Errorf("%w: %v", ErrHandOffUnknown, err)
	}
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNotHandedOver, err)
	}
	closeFDs(r.fds)
	if r.msg.Errno != "" || r.msg.Error != "" {
		return fmt.Errorf("%w: %s", ErrNotHandedOver, r.msg.Error)
	}
	return nil
}

// Conn is a connection another worker handed over: Read returns the bytes
// that worker had read but not processed first, then the socket's own.
// State is the application state the other worker sent with it.
type Conn struct {
	net.Conn
	state []byte

	mu     sync.Mutex
	unread []byte
}

// State returns the state the handing worker sent with the connection.
func (c *Conn) State() []byte { return c.state }

// Read reads the replayed bytes first, then from the socket.
func (c *Conn) Read(p []byte) (int, error) {
	c.mu.Lock()
	if len(c.unread) > 0 {
		n := copy(p, c.unread)
		c.unread = c.unread[n:]
		c.mu.Unlock()
		return n, nil
	}
	c.mu.Unlock()
	return c.Conn.Read(p)
}

// rest returns the replayed bytes nobody has read yet, without consuming
// them.
func (c *Conn) rest() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.unread
}

// SyscallConn returns the socket's raw connection.
func (c *Conn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("gorolling: %T has no descriptor", c.Conn)
	}
	return sc.SyscallConn()
}

// CloseWrite shuts down the writing side of the connection, like
// net.TCPConn's. Note that it does so for the socket, not this copy: never
// call it on a connection you are handing over.
func (c *Conn) CloseWrite() error {
	cw, ok := c.Conn.(interface{ CloseWrite() error })
	if !ok {
		return fmt.Errorf("gorolling: %T cannot close its writing side", c.Conn)
	}
	return cw.CloseWrite()
}

// adoptQueue bounds the connections taken but not yet returned by Accept.
const adoptQueue = 1024

// adoptListener is the listener Adopt returns.
type adoptListener struct {
	p    *proc
	key  string
	addr net.Addr
	ch   chan *Conn

	mu       sync.Mutex
	reserved int
	closed   bool
	done     chan struct{}
}

// Adopt makes this worker adopt the connections that draining workers of
// older generations hand over for l's socket, and returns a listener whose
// Accept returns them, each a *Conn. l must be a listener this package
// returned; keep accepting from it as well. Call Adopt before Ready: the
// master hands connections only to ready workers that adopt them.
//
// Outside gorolling, or under a master that does not relay connections, it
// returns a listener that never yields a connection until it is closed.
// ServeHTTP calls Adopt itself.
func Adopt(l net.Listener) (net.Listener, error) { return std.adopt(l) }

func (p *proc) adopt(l net.Listener) (net.Listener, error) {
	a := &adoptListener{p: p, addr: l.Addr(), ch: make(chan *Conn, adoptQueue), done: make(chan struct{})}
	cl, ok := p.relays()
	if !ok {
		return a, nil
	}
	key, ok := cl.keyFor(l.Addr())
	if !ok {
		return nil, fmt.Errorf("gorolling: adopt: %v is not a socket the master gave this worker", l.Addr())
	}
	a.key = key
	cl.mu.Lock()
	if prev := cl.adopters[key]; prev != nil && !prev.isClosed() {
		cl.mu.Unlock()
		return nil, fmt.Errorf("gorolling: adopt: connections of %s are adopted already", key)
	}
	cl.adopters[key] = a
	cl.mu.Unlock()
	r, err := cl.request(context.Background(), &handoff.Message{Type: handoff.TypeAdopt, Key: key})
	if err != nil {
		return nil, fmt.Errorf("gorolling: adopt %s: %w", key, err)
	}
	closeFDs(r.fds)
	if r.msg.Error != "" {
		return nil, fmt.Errorf("gorolling: adopt %s: %s", key, r.msg.Error)
	}
	return a, nil
}

// Accept waits for the next handed-over connection.
func (a *adoptListener) Accept() (net.Conn, error) {
	select {
	case c := <-a.ch:
		a.mu.Lock()
		a.reserved--
		a.mu.Unlock()
		return c, nil
	case <-a.done:
		return nil, &net.OpError{Op: "accept", Net: "gorolling", Addr: a.addr, Err: net.ErrClosed}
	}
}

// Close stops adopting. Connections taken but not accepted yet are handed
// on to the serving generation if this worker is draining, and closed
// otherwise.
func (a *adoptListener) Close() error {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return nil
	}
	a.closed = true
	close(a.done)
	a.mu.Unlock()
	go func() {
		for {
			select {
			case c := <-a.ch:
				a.handOn(c)
			default:
				return
			}
		}
	}()
	return nil
}

// handOn passes on a connection taken but never accepted, or closes it if
// no other worker takes it.
func (a *adoptListener) handOn(c *Conn) {
	if err := a.p.handOff(c, c.state, nil); err != nil {
		c.Close()
	}
}

// push queues a taken connection for Accept (room was reserved), or hands
// it on if the listener closed meanwhile.
func (a *adoptListener) push(c *Conn) {
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		a.handOn(c)
		return
	}
	a.ch <- c
	a.mu.Unlock()
}

// Addr returns the adopted socket's address.
func (a *adoptListener) Addr() net.Addr { return a.addr }

func (a *adoptListener) isClosed() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.closed
}

// reserve makes room for one more connection, or reports that there is
// none (closed, or the queue is full).
func (a *adoptListener) reserve() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed || a.reserved >= adoptQueue {
		return false
	}
	a.reserved++
	return true
}

func (a *adoptListener) unreserve() {
	a.mu.Lock()
	a.reserved--
	a.mu.Unlock()
}

// deliver takes (or declines) a connection the master brings: the accept
// first, and only once the master has said yes, the connection goes to
// Accept. Before that nothing reads or writes it, and a "no" closes this
// copy unread: the sender still holds the connection.
func (c *client) deliver(msg *handoff.Message, fd int) {
	c.mu.Lock()
	a := c.adopters[msg.Key]
	c.mu.Unlock()
	if a == nil || !a.reserve() {
		unix.Close(fd)
		_, _ = c.request(context.Background(), &handoff.Message{Type: handoff.TypeAccept, Conn: msg.Conn, Refuse: true})
		return
	}
	r, err := c.request(context.Background(), &handoff.Message{Type: handoff.TypeAccept, Conn: msg.Conn})
	if err == nil {
		closeFDs(r.fds)
	}
	if err != nil || r.msg.Errno != "" || r.msg.Error != "" {
		unix.Close(fd)
		a.unreserve()
		return
	}
	f := os.NewFile(uintptr(fd), "gorolling-conn")
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		// It was checked by the master; a failure here is a broken
		// process. The connection is lost with it.
		a.unreserve()
		return
	}
	a.push(&Conn{Conn: nc, state: msg.State, unread: msg.Unread})
}
