package handoff

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// A bundle carries a master's state and its sockets to the master that
// replaces it (a self-upgrade).
//
// The new master inherits one end of a long-lived SOCK_SEQPACKET socketpair,
// the rendezvous. For each try the old master queues one record on it,
//
//	{"v":1,"type":"stream"}  with one SCM_RIGHTS fd: the new master's end of
//	                         a socketpair made for this try, the stream
//
// and then streams the bundle on its own end of the stream while the new
// master reads it:
//
//	record 0:   {"v":1,"type":"bundle","fds":N,"meta_len":L}
//	then:       the L bytes of the JSON state, in records of raw bytes
//	then:       {"v":1,"type":"fd","index":i}, each with 1..64 fds: the
//	            sockets i, i+1, ... in order, N in all
//
// The new master answers on the stream ({"pid":P}, see Reply). Nothing is
// queued before the new master runs, so neither the socket buffer (a small
// net.core.wmem_max) nor the number of sockets can make the old master
// block: it sends while the new master reads, with a deadline, and gives up
// cleanly when the reader stalls or dies.
//
// An older master sends the whole bundle, in version 1, on the rendezvous
// itself before the new master starts: record 0 then carries the state
// inline ("meta") and every fd record one fd. ReceiveBundle accepts both.

type bundleHeader struct {
	V       int             `json:"v"`
	Type    string          `json:"type"`
	FDs     int             `json:"fds"`
	Meta    json.RawMessage `json:"meta,omitempty"`     // version 1
	MetaLen int             `json:"meta_len,omitempty"` // version 2
}

type bundleFD struct {
	V     int    `json:"v"`
	Type  string `json:"type"`
	Index int    `json:"index"`
}

// Limits of a bundle.
const (
	// MaxBundleFDs bounds the sockets one bundle carries.
	MaxBundleFDs = 65536
	// MaxBundleState bounds the encoded state of a bundle.
	MaxBundleState = 64 << 20
	// bundleFDsPerRecord is how many fds one fd record carries (the kernel
	// allows 253 per message).
	bundleFDsPerRecord = 64
	// bundleChunk is the largest record of state bytes.
	bundleChunk = 16 << 10
	// bundleReadTimeout bounds the new master's wait for each record.
	bundleReadTimeout = 30 * time.Second
)

// ErrBundle reports a malformed bundle.
var ErrBundle = errors.New("handoff: malformed bundle")

// seqpacketPair returns a close-on-exec SOCK_SEQPACKET socketpair.
func seqpacketPair() (int, int, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, -1, fmt.Errorf("handoff: socketpair: %w", err)
	}
	return fds[0], fds[1], nil
}

// Rendezvous makes the long-lived socketpair a master passes to its
// successors: the end it keeps (to queue each try's stream) and the end
// the successor inherits, both close-on-exec. The caller owns both.
func Rendezvous() (keep, give *os.File, err error) {
	a, b, err := seqpacketPair()
	if err != nil {
		return nil, nil, err
	}
	return os.NewFile(uintptr(a), "gorolling-rendezvous"), os.NewFile(uintptr(b), "gorolling-rendezvous-child"), nil
}

// OpenStream makes the socketpair of one try and queues the successor's
// end on the rendezvous (raw descriptor rendezvous, the kept end of
// Rendezvous). It returns the sender's end, non-blocking and close-on-exec,
// which the caller streams the bundle on with SendBundle and then closes.
// sndbuf > 0 sets the stream's send buffer (for tests).
func OpenStream(rendezvous, sndbuf int) (int, error) {
	send, recv, err := seqpacketPair()
	if err != nil {
		return -1, err
	}
	defer unix.Close(recv) // the kernel holds it in flight for the successor
	if sndbuf > 0 {
		_ = unix.SetsockoptInt(send, unix.SOL_SOCKET, unix.SO_SNDBUF, sndbuf)
	}
	if err := unix.SetNonblock(send, true); err != nil {
		unix.Close(send)
		return -1, err
	}
	rec, _ := json.Marshal(bundleFD{V: Version, Type: "stream"})
	if err := unix.Sendmsg(rendezvous, rec, unix.UnixRights(recv), nil, unix.MSG_DONTWAIT); err != nil {
		unix.Close(send)
		return -1, fmt.Errorf("handoff: queue the state stream: %w", err)
	}
	return send, nil
}

// SendBundle streams meta (JSON-encoded) and fds on the sender's end of a
// stream (raw, non-blocking descriptor fd) while the successor reads them.
// It fails if the successor takes no record for idle, or once abort is
// closed (the successor is gone). The caller keeps its fds; the kernel
// holds duplicates in flight until the successor reads them or the stream
// closes.
func SendBundle(fd int, meta any, fds []int, idle time.Duration, abort <-chan struct{}) error {
	if len(fds) > MaxBundleFDs {
		return fmt.Errorf("handoff: bundle of %d fds: more than %d", len(fds), MaxBundleFDs)
	}
	m, err := json.Marshal(meta)
	if err != nil {
		return fmt.Errorf("handoff: encode bundle: %w", err)
	}
	if len(m) > MaxBundleState {
		return fmt.Errorf("handoff: bundle state of %d bytes is too large", len(m))
	}
	chunk := bundleChunk
	if sb, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF); err == nil && sb/2 < chunk {
		chunk = max(sb/2, 512) // a record must fit the send buffer
	}
	sent := 0
	send := func(what string, b []byte, oob []byte) error {
		last := time.Now()
		for {
			err := unix.Sendmsg(fd, b, oob, nil, unix.MSG_DONTWAIT)
			if err == nil {
				return nil
			}
			if !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EINTR) {
				return fmt.Errorf("handoff: send %s: %w", what, err)
			}
			select {
			case <-abort:
				return fmt.Errorf("handoff: the new master went away after %d of %d sockets", sent, len(fds))
			default:
			}
			if time.Since(last) > idle {
				return fmt.Errorf("handoff: the new master read nothing for %s (%d of %d sockets sent)", idle, sent, len(fds))
			}
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
			_, _ = unix.Poll(pfd, 100)
		}
	}
	h, _ := json.Marshal(bundleHeader{V: Version, Type: "bundle", FDs: len(fds), MetaLen: len(m)})
	if err := send("bundle header", h, nil); err != nil {
		return err
	}
	for off := 0; off < len(m); off += chunk {
		if err := send("bundle state", m[off:min(off+chunk, len(m))], nil); err != nil {
			return err
		}
	}
	for i := 0; i < len(fds); i += bundleFDsPerRecord {
		batch := fds[i:min(i+bundleFDsPerRecord, len(fds))]
		rec, _ := json.Marshal(bundleFD{V: Version, Type: "fd", Index: i})
		if err := send(fmt.Sprintf("bundle fds %d..%d", i, i+len(batch)-1), rec, unix.UnixRights(batch...)); err != nil {
			return err
		}
		sent += len(batch)
	}
	return nil
}

// ReceiveBundle reads a whole bundle from the inherited end of a
// rendezvous (raw descriptor fd), decoding the state into meta. It returns
// the sockets (close-on-exec, the caller's) and the descriptor to answer on
// with Reply: the stream, which the caller closes, or fd itself for a
// bundle in version 1. On error it closes every descriptor it received.
func ReceiveBundle(fd int, meta any) (fds []int, reply int, err error) {
	setReadTimeout(fd)
	buf := make([]byte, max(bundleChunk, MaxMessageSize*16))
	oob := make([]byte, unix.CmsgSpace(4*bundleFDsPerRecord))
	n, got, err := recvRecord(fd, buf, oob)
	if err != nil {
		return nil, -1, err
	}
	var first bundleFD
	if json.Unmarshal(buf[:n], &first) == nil && first.Type == "stream" {
		if len(got) != 1 {
			closeAll(got)
			return nil, -1, fmt.Errorf("%w: a stream record with %d fds", ErrBundle, len(got))
		}
		s := got[0]
		setReadTimeout(s)
		if n, got, err = recvRecord(s, buf, oob); err != nil {
			unix.Close(s)
			return nil, -1, err
		}
		fds, err := readBundle(s, buf, oob, n, got, meta)
		if err != nil {
			unix.Close(s)
			return nil, -1, err
		}
		return fds, s, nil
	}
	fds, err = readBundle(fd, buf, oob, n, got, meta)
	return fds, fd, err
}

// readBundle reads the rest of a bundle whose first record (n bytes in
// buf, with the fds got) has been read.
func readBundle(fd int, buf, oob []byte, n int, got []int, meta any) ([]int, error) {
	var fds []int
	fail := func(err error) ([]int, error) {
		closeAll(got)
		closeAll(fds)
		return nil, err
	}
	var h bundleHeader
	if len(got) != 0 || json.Unmarshal(buf[:n], &h) != nil || h.V != Version || h.Type != "bundle" ||
		h.FDs < 0 || h.FDs > MaxBundleFDs || h.MetaLen < 0 || h.MetaLen > MaxBundleState {
		return fail(fmt.Errorf("%w: bad header %q", ErrBundle, buf[:min(n, 200)]))
	}
	state := []byte(h.Meta)
	if h.MetaLen > 0 {
		state = make([]byte, 0, h.MetaLen)
		for len(state) < h.MetaLen {
			n, got, err := recvRecord(fd, buf, oob)
			if err != nil {
				return fail(err)
			}
			if len(got) != 0 || len(state)+n > h.MetaLen {
				closeAll(got)
				return fail(fmt.Errorf("%w: bad state record", ErrBundle))
			}
			state = append(state, buf[:n]...)
		}
	}
	if err := json.Unmarshal(state, meta); err != nil {
		return fail(fmt.Errorf("%w: state: %v", ErrBundle, err))
	}
	got = nil
	for len(fds) < h.FDs {
		n, rec, err := recvRecord(fd, buf, oob)
		if err != nil {
			return fail(err)
		}
		fds = append(fds, rec...)
		var r bundleFD
		if len(rec) == 0 || len(fds) > h.FDs || json.Unmarshal(buf[:n], &r) != nil || r.Type != "fd" || r.Index != len(fds)-len(rec) {
			return fail(fmt.Errorf("%w: bad fd record at socket %d", ErrBundle, len(fds)-len(rec)))
		}
	}
	return fds, nil
}

// recvRecord reads one record and its descriptors (close-on-exec). On a
// truncated record it closes what came and fails.
func recvRecord(fd int, buf, oob []byte) (int, []int, error) {
	for {
		n, oobn, flags, _, err := unix.Recvmsg(fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, nil, fmt.Errorf("handoff: receive bundle: %w", err)
		}
		got, cerr := parseControl(oob[:oobn])
		if cerr != nil || flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
			closeAll(got)
			return 0, nil, fmt.Errorf("%w: truncated record", ErrBundle)
		}
		if n == 0 && len(got) == 0 {
			return 0, nil, fmt.Errorf("%w: the sender closed the stream early", ErrBundle)
		}
		return n, got, nil
	}
}

// Reply sends the successor's answer (b, a small JSON object) on the
// descriptor ReceiveBundle returned, without blocking.
func Reply(fd int, b []byte) error {
	return unix.Sendmsg(fd, b, nil, nil, unix.MSG_DONTWAIT)
}

// ReadReply reads the successor's answer from the sender's end of a stream,
// without blocking; nil if there is none.
func ReadReply(fd int) []byte {
	buf := make([]byte, 512)
	n, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
	if err != nil || n <= 0 {
		return nil
	}
	return buf[:n]
}

// DiscardBundle reads and closes whatever is still queued on a receiving
// end that nobody took (a failed self-upgrade), without blocking, so the
// descriptors in flight are released.
func DiscardBundle(fd int) {
	buf := make([]byte, 512)
	oob := make([]byte, unix.CmsgSpace(4*bundleFDsPerRecord))
	for {
		n, oobn, _, _, err := unix.Recvmsg(fd, buf, oob, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
		if err != nil || (n == 0 && oobn == 0) { // nothing queued, or the peer closed
			return
		}
		closeAll(controlFDs(oob[:oobn]))
	}
}

func setReadTimeout(fd int) {
	tv := unix.NsecToTimeval(bundleReadTimeout.Nanoseconds())
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
