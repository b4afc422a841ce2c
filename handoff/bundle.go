package handoff

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// A bundle carries a master's state and its sockets to the master that
// replaces it (a self-upgrade). It travels over a SOCK_SEQPACKET socketpair
// whose receiving end the new master inherits:
//
//	record 0:     {"v":1,"type":"bundle","fds":N,"meta":{...}}
//	records 1..N: {"v":1,"type":"fd","index":i} with one SCM_RIGHTS fd
//
// The whole bundle is queued in the socket buffer before the new master
// starts, so sending never waits for the receiver.

type bundleHeader struct {
	V    int             `json:"v"`
	Type string          `json:"type"`
	FDs  int             `json:"fds"`
	Meta json.RawMessage `json:"meta,omitempty"`
}

type bundleFD struct {
	V     int    `json:"v"`
	Type  string `json:"type"`
	Index int    `json:"index"`
}

// MaxBundleFDs bounds the sockets one bundle carries.
const MaxBundleFDs = 4096

// ErrBundle reports a malformed bundle.
var ErrBundle = errors.New("handoff: malformed bundle")

// BundlePair makes the socketpair a bundle travels over: the sender's end
// and the receiver's end, both close-on-exec and blocking. Its buffers are
// enlarged so that a large registry fits.
func BundlePair() (send, recv *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("handoff: bundle socketpair: %w", err)
	}
	_ = unix.SetsockoptInt(fds[0], unix.SOL_SOCKET, unix.SO_SNDBUF, 4<<20)
	_ = unix.SetsockoptInt(fds[1], unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	return os.NewFile(uintptr(fds[0]), "gorolling-bundle-send"), os.NewFile(uintptr(fds[1]), "gorolling-bundle-recv"), nil
}

// SendBundle queues meta (JSON-encoded) and fds on the sending end. The
// caller keeps its fds; the kernel holds duplicates in flight until the
// receiver reads them or the receiving end is closed. fd is the raw
// descriptor of the sending end.
func SendBundle(fd int, meta any, fds []int) error {
	if len(fds) > MaxBundleFDs {
		return fmt.Errorf("handoff: bundle of %d fds: more than %d", len(fds), MaxBundleFDs)
	}
	m, err := json.Marshal(meta)
	if err != nil {
		return fmt.Errorf("handoff: encode bundle: %w", err)
	}
	h, _ := json.Marshal(bundleHeader{V: Version, Type: "bundle", FDs: len(fds), Meta: m})
	if len(h) > MaxMessageSize*16 {
		return fmt.Errorf("handoff: bundle state of %d bytes is too large", len(h))
	}
	if err := unix.Sendmsg(fd, h, nil, nil, 0); err != nil {
		return fmt.Errorf("handoff: send bundle: %w", err)
	}
	for i, x := range fds {
		rec, _ := json.Marshal(bundleFD{V: Version, Type: "fd", Index: i})
		if err := unix.Sendmsg(fd, rec, unix.UnixRights(x), nil, 0); err != nil {
			return fmt.Errorf("handoff: send bundle fd %d: %w", i, err)
		}
	}
	return nil
}

// ReceiveBundle reads a whole bundle from the receiving end (raw
// descriptor fd), decoding the state into meta. The descriptors it returns
// are close-on-exec and belong to the caller. On error it closes every
// descriptor it received.
func ReceiveBundle(fd int, meta any) ([]int, error) {
	buf := make([]byte, MaxMessageSize*16)
	oob := make([]byte, unix.CmsgSpace(4*MaxFDs))
	var fds []int
	fail := func(err error) ([]int, error) {
		for _, x := range fds {
			unix.Close(x)
		}
		return nil, err
	}
	n, oobn, flags, _, err := unix.Recvmsg(fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("handoff: receive bundle: %w", err)
	}
	got, cerr := parseControl(oob[:oobn])
	fds = append(fds, got...)
	if cerr != nil || len(got) != 0 || flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || n == 0 {
		return fail(fmt.Errorf("%w: bad header record", ErrBundle))
	}
	var h bundleHeader
	if err := json.Unmarshal(buf[:n], &h); err != nil || h.V != Version || h.Type != "bundle" || h.FDs < 0 || h.FDs > MaxBundleFDs {
		return fail(fmt.Errorf("%w: bad header %q", ErrBundle, buf[:min(n, 200)]))
	}
	if err := json.Unmarshal(h.Meta, meta); err != nil {
		return fail(fmt.Errorf("%w: state: %v", ErrBundle, err))
	}
	for i := 0; i < h.FDs; i++ {
		n, oobn, flags, _, err := unix.Recvmsg(fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err != nil {
			return fail(fmt.Errorf("handoff: receive bundle fd %d: %w", i, err))
		}
		got, cerr := parseControl(oob[:oobn])
		fds = append(fds, got...)
		var r bundleFD
		if cerr != nil || len(got) != 1 || flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 ||
			json.Unmarshal(buf[:n], &r) != nil || r.Type != "fd" || r.Index != i {
			return fail(fmt.Errorf("%w: bad fd record %d", ErrBundle, i))
		}
	}
	return fds, nil
}

// DiscardBundle reads and closes whatever is still queued on a receiving
// end that nobody took (a failed self-upgrade), without blocking, so the
// sockets in flight are released.
func DiscardBundle(fd int) {
	buf := make([]byte, 512)
	oob := make([]byte, unix.CmsgSpace(4*MaxFDs))
	for {
		_, oobn, _, _, err := unix.Recvmsg(fd, buf, oob, unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
		if err != nil {
			return
		}
		for _, x := range controlFDs(oob[:oobn]) {
			unix.Close(x)
		}
	}
}
