package handoff

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// oobSize is the ancillary buffer: room for MaxFDs descriptors and one
// SCM_CREDENTIALS message. A peer sending more gets MSG_CTRUNC and is
// rejected.
var oobSize = unix.CmsgSpace(4*MaxFDs) + unix.CmsgSpace(unix.SizeofUcred)

// Conn is one end of a handoff channel. Send may be called from several
// goroutines; Receive must be called from one goroutine at a time.
type Conn struct {
	uc *net.UnixConn

	wmu          sync.Mutex
	writeTimeout time.Duration

	buf []byte
	oob []byte
}

// NewConn wraps a connected SOCK_SEQPACKET unix socket. The Conn owns uc
// and closes it in Close.
func NewConn(uc *net.UnixConn) *Conn {
	return &Conn{
		uc:  uc,
		buf: make([]byte, MaxMessageSize),
		oob: make([]byte, oobSize),
	}
}

// Pair makes a new channel: a SOCK_SEQPACKET socketpair, both ends
// close-on-exec. It returns the master's end as a Conn and the worker's end
// as a file for exec.Cmd.ExtraFiles. The caller closes the file once the
// worker has started (or failed to), so that the Conn sees EOF when the
// worker is gone.
func Pair() (*Conn, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("handoff: socketpair: %w", err)
	}
	c, err := fdConn(fds[0])
	if err != nil {
		unix.Close(fds[1])
		return nil, nil, err
	}
	return c, os.NewFile(uintptr(fds[1]), "gorolling-handoff"), nil
}

// FromFD wraps an inherited descriptor, the worker's end of a channel. It
// checks that fd is an AF_UNIX SOCK_SEQPACKET socket, and closes fd (the
// Conn holds its own duplicate) whether or not it succeeds.
func FromFD(fd int) (*Conn, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("handoff: check fd %d: %w", fd, err)
	}
	dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("handoff: check fd %d: %w", fd, err)
	}
	if typ != unix.SOCK_SEQPACKET || dom != unix.AF_UNIX {
		unix.Close(fd)
		return nil, fmt.Errorf("handoff: fd %d is not a unix seqpacket socket", fd)
	}
	return fdConn(fd)
}

// fdConn turns a raw socket fd into a Conn, closing fd.
func fdConn(fd int) (*Conn, error) {
	f := os.NewFile(uintptr(fd), "gorolling-handoff")
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("handoff: wrap channel: %w", err)
	}
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		nc.Close()
		return nil, fmt.Errorf("handoff: channel is %T, not a unix socket", nc)
	}
	return NewConn(uc), nil
}

// SetWriteTimeout bounds every later Send: a peer that stops reading makes
// Send fail after d instead of blocking. Zero means no bound.
func (c *Conn) SetWriteTimeout(d time.Duration) {
	c.wmu.Lock()
	c.writeTimeout = d
	c.wmu.Unlock()
}

// Send validates, encodes and sends m with fds attached as SCM_RIGHTS. The
// caller keeps ownership of fds. Send is safe for concurrent use.
func (c *Conn) Send(m *Message, fds ...int) error { return c.send(0, m, fds) }

// send sends m bounded by limit, if positive and shorter than the write
// timeout.
func (c *Conn) send(limit time.Duration, m *Message, fds []int) error {
	if len(fds) > MaxFDs {
		return fmt.Errorf("handoff: send %d fds: more than %d", len(fds), MaxFDs)
	}
	b, err := Marshal(m)
	if err != nil {
		return err
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	d := c.writeTimeout
	if limit > 0 && (d == 0 || limit < d) {
		d = limit
	}
	if d > 0 {
		_ = c.uc.SetWriteDeadline(time.Now().Add(d))
	} else {
		_ = c.uc.SetWriteDeadline(time.Time{})
	}
	if _, _, err := c.uc.WriteMsgUnix(b, oob, nil); err != nil {
		return fmt.Errorf("handoff: send %s: %w", m.Type, err)
	}
	return nil
}

// SendWithin is Send bounded by d (or the write timeout, if shorter)
// instead of the write timeout.
func (c *Conn) SendWithin(d time.Duration, m *Message, fds ...int) error {
	if d <= 0 {
		return fmt.Errorf("handoff: send %s: %w", m.Type, os.ErrDeadlineExceeded)
	}
	return c.send(d, m, fds)
}

// Receive reads one message. The descriptors that came with it are
// close-on-exec and belong to the caller.
//
// It returns io.EOF when the peer has closed its end (a zero-length record
// and a reset count as EOF too). On a malformed, truncated or oversized record it
// closes every descriptor that arrived with it and returns an error that
// wraps ErrMalformed, ErrVersion, ErrTruncated or ErrTooLarge; the channel
// is then still readable, but the peer should be treated as broken.
func (c *Conn) Receive() (*Message, []int, error) {
	n, oobn, flags, _, err := c.uc.ReadMsgUnix(c.buf, c.oob)
	if err != nil || n == 0 {
		// A record may still have delivered descriptors.
		Discard(controlFDs(c.oob[:oobn]))
		// ECONNRESET: the peer exited with messages it never read; for
		// the reader that is the same as a close.
		if err == nil || errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			return nil, nil, io.EOF
		}
		return nil, nil, fmt.Errorf("handoff: receive: %w", err)
	}
	return decode(c.buf[:n], c.oob[:oobn], flags, func(fd int) { Discard([]int{fd}) })
}

// Close closes the channel. Pending Receive calls return an error.
func (c *Conn) Close() error {
	return c.uc.Close()
}

// soPassRights is SO_PASSRIGHTS (Linux 6.16): with it off, the kernel
// refuses to queue descriptors for a socket at all; the sender's sendmsg
// fails with EPERM.
const soPassRights = 83

// RefuseDescriptors makes the kernel refuse every descriptor sent to this
// end (the master's end: workers have no descriptor to give it). It
// returns an error on kernels without SO_PASSRIGHTS (before 6.16), where
// the receiver discards what arrives instead.
func (c *Conn) RefuseDescriptors() error {
	rc, err := c.uc.SyscallConn()
	if err != nil {
		return err
	}
	return RefuseDescriptors(rc)
}

// AllowDescriptors undoes RefuseDescriptors: the master's end of a worker
// that may now hand connections over.
func (c *Conn) AllowDescriptors() error {
	rc, err := c.uc.SyscallConn()
	if err != nil {
		return err
	}
	return passRights(rc, 1)
}

// RefuseDescriptors sets SO_PASSRIGHTS off on the socket rc, if the kernel
// knows it.
func RefuseDescriptors(rc syscall.RawConn) error { return passRights(rc, 0) }

func passRights(rc syscall.RawConn, on int) error {
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, soPassRights, on)
	}); err != nil {
		return err
	}
	return serr
}

// Discard closes descriptors a peer sent that nobody wants, without ever
// blocking the caller: closing the last copy of a TCP socket with unsent
// data and a long SO_LINGER (a hostile sender can arrange both) would block
// in close(2), and so can a file whose filesystem hangs in flush (a FUSE
// mount the sender serves). Sockets get an abortive close (linger 0: a
// reset, at once); files and directories are closed on a goroutine of
// their own; the rest (pipes, devices) close at once.
func Discard(fds []int) {
	for _, fd := range fds {
		var st unix.Stat_t
		_ = unix.Fstat(fd, &st)
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFSOCK:
			_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
			unix.Close(fd)
		case unix.S_IFREG, unix.S_IFDIR:
			go unix.Close(fd)
		default:
			unix.Close(fd)
		}
	}
}

// decode turns one received record into a message and its descriptors. On
// any error it passes every descriptor found in oob to closeFn and returns
// no descriptors. It never panics, whatever the input.
func decode(data, oob []byte, flags int, closeFn func(int)) (*Message, []int, error) {
	fds, cerr := parseControl(oob)
	fail := func(err error) (*Message, []int, error) {
		for _, fd := range fds {
			closeFn(fd)
		}
		return nil, nil, err
	}
	if flags&unix.MSG_TRUNC != 0 {
		return fail(fmt.Errorf("%w: record longer than %d bytes", ErrTruncated, MaxMessageSize))
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return fail(fmt.Errorf("%w: control data cut short (too many fds)", ErrTruncated))
	}
	if cerr != nil {
		return fail(cerr)
	}
	if len(fds) > MaxFDs {
		return fail(fmt.Errorf("%w: %d fds attached, at most %d", ErrMalformed, len(fds), MaxFDs))
	}
	m, err := Unmarshal(data)
	if err != nil {
		return fail(err)
	}
	return m, fds, nil
}

// controlFDs returns every descriptor in oob, ignoring parse errors.
func controlFDs(oob []byte) []int {
	fds, _ := parseControl(oob)
	return fds
}

// parseControl walks the control messages in oob and collects the
// descriptors of every SCM_RIGHTS message. It decodes headers with explicit
// byte order instead of pointer casts, so unaligned input is safe. It
// returns the descriptors found before any error, so the caller can close
// them.
func parseControl(oob []byte) ([]int, error) {
	var fds []int
	hdr := unix.SizeofCmsghdr
	for len(oob) >= hdr {
		var length uint64
		if hdr == 16 {
			length = binary.NativeEndian.Uint64(oob[0:8])
		} else {
			length = uint64(binary.NativeEndian.Uint32(oob[0:4]))
		}
		level := int32(binary.NativeEndian.Uint32(oob[hdr-8 : hdr-4]))
		typ := int32(binary.NativeEndian.Uint32(oob[hdr-4 : hdr]))
		if length < uint64(hdr) || length > uint64(len(oob)) {
			return fds, fmt.Errorf("%w: bad control message length %d", ErrMalformed, length)
		}
		data := oob[hdr:length]
		switch {
		case level == unix.SOL_SOCKET && typ == unix.SCM_RIGHTS:
			for len(data) >= 4 {
				fds = append(fds, int(int32(binary.NativeEndian.Uint32(data[:4]))))
				data = data[4:]
			}
		case level == unix.SOL_SOCKET && typ == unix.SCM_CREDENTIALS:
			// Present when the receiver enabled SO_PASSCRED; not used here.
		default:
			return fds, fmt.Errorf("%w: unexpected control message level %d type %d", ErrMalformed, level, typ)
		}
		next := cmsgAlign(length)
		if next >= uint64(len(oob)) {
			break
		}
		oob = oob[next:]
	}
	return fds, nil
}

func cmsgAlign(n uint64) uint64 {
	const salign = uint64(unix.SizeofPtr)
	return (n + salign - 1) &^ (salign - 1)
}
