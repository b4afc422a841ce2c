package worker

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// HTTP/1.1 hand-off. ServeHTTP wraps every connection in an httpConn,
// which knows when the server waits for the next request on it: net/http
// reports the connection idle (ConnState) and then reads, through its
// buffered reader, to see the next request's first bytes. If that buffer is
// empty, the read asks for the buffer's whole size, the same size as the
// connection's very first read; if it is shorter, the server still holds
// bytes of a request it has not answered, and the connection is not handed
// over at this point (it is at its next idle point). So a connection is
// handed over only between two requests, when the server holds nothing of
// it, and every byte the client sends is read by exactly one server: the
// old one's read is interrupted with a past deadline, and bytes that
// arrive in that read go along as unread bytes.

// errHandedOver ends the old server's read of a connection that another
// worker has now. net/http treats io.EOF on the idle read as a client that
// left, and closes its copy quietly.
var errHandedOver = io.EOF

// pastDeadline interrupts a blocked read at once.
var pastDeadline = time.Unix(1, 0)

// httpHandoff is what the connections of one ServeHTTP share.
type httpHandoff struct {
	p        *proc
	key      string
	enabled  bool // hand connections over when draining (not HTTPOptions.NoHandoff)
	draining atomic.Bool
	// fellBack counts connections whose hand-off failed; they finish the
	// old way (Connection: close).
	fellBack  atomic.Int64
	fellBackC chan struct{}
}

// httpConn is a server connection that can be handed over between two
// requests.
type httpConn struct {
	net.Conn
	h *httpHandoff

	mu          sync.Mutex
	size        int       // the length of the server's first read: its read buffer
	idle        bool      // the server said it is idle; its next read waits for a request
	inIdleRead  bool      // blocked in that read
	interrupted bool      // that read was interrupted for a hand-off
	deadline    time.Time // the read deadline the server set
	gone        bool      // handed over
	fallback    bool      // its hand-off failed: finish it the old way
}

// handoffListener wraps the connections its listener accepts.
type handoffListener struct {
	net.Listener
	h *httpHandoff
}

func (l handoffListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &httpConn{Conn: c, h: l.h, idle: true}, nil
}

// SyscallConn gives the socket's descriptor, so that a connection the
// handler hijacked (a WebSocket after its handshake) can be handed over
// with HandOff.
func (c *httpConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("%T has no descriptor", c.Conn)
	}
	return sc.SyscallConn()
}

// setIdle is called when the server reports the connection idle.
func (c *httpConn) setIdle() {
	c.mu.Lock()
	c.idle = true
	c.mu.Unlock()
}

// startDrain interrupts the connection's read if it waits for a request.
// A connection that does not wait is handed over at its next idle read.
func (c *httpConn) startDrain() {
	c.mu.Lock()
	if c.inIdleRead && !c.interrupted {
		c.interrupted = true
		_ = c.Conn.SetReadDeadline(pastDeadline)
	}
	c.mu.Unlock()
}

// fellBack reports whether the connection finishes the old way.
func (c *httpConn) fellBack() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.fallback
}

func (c *httpConn) Read(p []byte) (int, error) {
	c.mu.Lock()
	if c.gone {
		c.mu.Unlock()
		return 0, errHandedOver
	}
	if c.size == 0 {
		c.size = len(p)
	}
	idleRead := c.idle && len(p) == c.size && len(p) > 0
	c.idle = false
	if !idleRead || c.fallback {
		c.mu.Unlock()
		return c.Conn.Read(p)
	}
	var n int
	var err error
	for {
		if c.h.draining.Load() {
			unread := p[:n]
			if ac, ok := c.Conn.(*Conn); ok {
				// Replayed bytes of an earlier hand-off that the
				// server has not read yet come after these.
				if rest := ac.rest(); len(rest) > 0 {
					unread = append(append([]byte(nil), p[:n]...), rest...)
				}
			}
			c.mu.Unlock()
			herr := c.h.p.handOffFD(c.Conn, c.h.key, nil, unread)
			c.mu.Lock()
			if herr == nil || errors.Is(herr, ErrHandOffUnknown) {
				// Handed over, or (the master died holding the offer)
				// closed unread: either way this server is done with it.
				c.gone = true
				c.mu.Unlock()
				return 0, errHandedOver
			}
			c.fallback = true
			c.h.fellBack.Add(1)
			select {
			case c.h.fellBackC <- struct{}{}:
			default:
			}
			_ = c.Conn.SetReadDeadline(c.deadline)
			c.mu.Unlock()
			if n > 0 {
				return n, err // what the interrupted read got: this server answers it
			}
			return c.Conn.Read(p)
		}
		c.inIdleRead = true
		c.mu.Unlock()
		n, err = c.Conn.Read(p)
		c.mu.Lock()
		c.inIdleRead = false
		if !c.interrupted {
			c.mu.Unlock()
			return n, err
		}
		c.interrupted = false
		if n == 0 && !errors.Is(err, os.ErrDeadlineExceeded) {
			c.mu.Unlock()
			return n, err // the client left, or the socket failed: nothing to hand over
		}
		// Interrupted: loop to hand over, with what the read got.
	}
}

func (c *httpConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deadline = t
	if c.interrupted {
		return nil // restored when the interrupted read has returned
	}
	return c.Conn.SetReadDeadline(t)
}

func (c *httpConn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.Conn.SetWriteDeadline(t)
}

// CloseWrite half-closes the socket, as net/http does before closing a
// connection whose request body it did not read. It never runs on a
// connection that was handed over: net/http only closes those.
func (c *httpConn) CloseWrite() error {
	c.mu.Lock()
	gone := c.gone
	c.mu.Unlock()
	cw, ok := c.Conn.(interface{ CloseWrite() error })
	if gone || !ok {
		return nil
	}
	return cw.CloseWrite()
}
