package handoff

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func openFDs(t *testing.T) int {
	t.Helper()
	// Start the runtime poller first: its descriptors are not leaks.
	if l, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		l.Close()
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func intp(n int) *int { return &n }

func TestRoundTripWithFD(t *testing.T) {
	before := openFDs(t)
	master, wf, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	w, err := FromFD(int(dupFD(t, wf)))
	wf.Close()
	if err != nil {
		t.Fatal(err)
	}

	req := &Message{V: Version, Type: TypeListen, Seq: 1, Listen: &ListenRequest{Network: "tcp", Address: "127.0.0.1:0"}}
	if err := w.Send(req); err != nil {
		t.Fatal(err)
	}
	got, fds, err := master.Receive()
	if err != nil {
		t.Fatal(err)
	}
	if len(fds) != 0 || got.Type != TypeListen || got.Listen.Address != "127.0.0.1:0" || got.Seq != 1 {
		t.Fatalf("got %+v fds %v", got, fds)
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var lfd int
	rc, _ := l.(*net.TCPListener).SyscallConn()
	rc.Control(func(fd uintptr) { lfd = int(fd) })
	if err := master.Send(&Message{V: Version, Type: TypeReply, ReplyTo: 1, Network: "tcp", Address: l.Addr().String()}, lfd); err != nil {
		t.Fatal(err)
	}
	rep, fds, err := w.Receive()
	if err != nil {
		t.Fatal(err)
	}
	if rep.ReplyTo != 1 || len(fds) != 1 {
		t.Fatalf("reply %+v fds %v", rep, fds)
	}
	flags, err := unix.FcntlInt(uintptr(fds[0]), unix.F_GETFD, 0)
	if err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Fatalf("received fd not close-on-exec: flags %v err %v", flags, err)
	}
	unix.Close(fds[0])

	l.Close()
	master.Close()
	if _, _, err := w.Receive(); !errors.Is(err, io.EOF) {
		t.Fatalf("after master close: %v, want EOF", err)
	}
	w.Close()
	if after := openFDs(t); after != before {
		t.Fatalf("fd count %d, want %d", after, before)
	}
}

func dupFD(t *testing.T, f *os.File) uintptr {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var d int
	var derr error
	rc.Control(func(fd uintptr) { d, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) })
	if derr != nil {
		t.Fatal(derr)
	}
	return uintptr(d)
}

// rawPair returns a raw SEQPACKET pair: the test writes arbitrary records on
// raw and reads them with the Conn.
func rawPair(t *testing.T) (*Conn, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	c, err := fdConn(fds[0])
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); unix.Close(fds[1]) })
	return c, fds[1]
}

func TestMalformedClosesFDs(t *testing.T) {
	devnull := func() int {
		fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		return fd
	}
	cases := []struct {
		name    string
		data    string
		nfds    int
		wantErr error
	}{
		{name: "bad json", data: "{not json", nfds: 1, wantErr: ErrMalformed},
		{name: "unknown type", data: `{"v":1,"type":"explode","seq":1}`, nfds: 2, wantErr: ErrMalformed},
		{name: "wrong version", data: `{"v":2,"type":"ready","seq":1}`, nfds: 1, wantErr: ErrVersion},
		{name: "trailing data", data: `{"v":1,"type":"ready","seq":1}{}`, nfds: 1, wantErr: ErrMalformed},
		{name: "more fds than allowed", data: `{"v":1,"type":"ready","seq":1}`, nfds: 5, wantErr: ErrMalformed},
		{name: "fds overflow the control buffer", data: `{"v":1,"type":"ready","seq":1}`, nfds: 40, wantErr: ErrTruncated},
		{name: "huge record", data: `{"v":1,"type":"ready","seq":1,"x":"` + strings.Repeat("a", MaxMessageSize) + `"}`, nfds: 1, wantErr: ErrTruncated},
		{name: "listen without request", data: `{"v":1,"type":"listen","seq":3}`, nfds: 0, wantErr: ErrMalformed},
		{name: "bad network", data: `{"v":1,"type":"listen","seq":3,"listen":{"network":"sctp","address":":1"}}`, nfds: 0, wantErr: ErrMalformed},
		{name: "packet mismatch", data: `{"v":1,"type":"listen","seq":3,"listen":{"network":"udp","address":":1"}}`, nfds: 0, wantErr: ErrMalformed},
		{name: "index out of range", data: `{"v":1,"type":"listen","seq":3,"listen":{"network":"tcp","address":":1","index":5000}}`, nfds: 0, wantErr: ErrMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, raw := rawPair(t)
			if err := unix.SetsockoptInt(raw, unix.SOL_SOCKET, unix.SO_SNDBUF, 1<<20); err != nil {
				t.Fatal(err)
			}
			before := openFDs(t)
			var fds []int
			for i := 0; i < tc.nfds; i++ {
				fds = append(fds, devnull())
			}
			var oob []byte
			if len(fds) > 0 {
				oob = unix.UnixRights(fds...)
			}
			if err := unix.Sendmsg(raw, []byte(tc.data), oob, nil, 0); err != nil {
				t.Fatal(err)
			}
			for _, fd := range fds {
				unix.Close(fd)
			}
			m, got, err := c.Receive()
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err %v, want %v (msg %+v)", err, tc.wantErr, m)
			}
			if len(got) != 0 {
				t.Fatalf("fds returned with an error: %v", got)
			}
			if after := openFDs(t); after != before {
				t.Fatalf("fd count %d after a rejected record, want %d", after, before)
			}
		})
	}
}

func TestFromFDRejectsOtherSockets(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[1])
	if _, err := FromFD(fds[0]); err == nil {
		t.Fatal("stream socket accepted as a handoff channel")
	}
	if _, err := unix.FcntlInt(uintptr(fds[0]), unix.F_GETFD, 0); err == nil {
		t.Fatal("FromFD did not close the rejected fd")
	}
}

func TestNormalize(t *testing.T) {
	cases := []struct {
		name    string
		req     ListenRequest
		want    Key
		wantErr bool
	}{
		{name: "wildcard", req: ListenRequest{Network: "tcp", Address: ":8080"}, want: Key{Network: "tcp", Address: ":8080"}},
		{name: "ipv4 wildcard on tcp is dual-stack", req: ListenRequest{Network: "tcp", Address: "0.0.0.0:8080"}, want: Key{Network: "tcp", Address: ":8080"}},
		{name: "ipv6 wildcard on tcp is dual-stack", req: ListenRequest{Network: "tcp", Address: "[::]:8080"}, want: Key{Network: "tcp", Address: ":8080"}},
		{name: "tcp4 wildcard", req: ListenRequest{Network: "tcp4", Address: ":8080"}, want: Key{Network: "tcp4", Address: "0.0.0.0:8080"}},
		{name: "tcp6 wildcard", req: ListenRequest{Network: "tcp6", Address: ":8080"}, want: Key{Network: "tcp6", Address: "[::]:8080"}},
		{name: "ipv4 literal on tcp", req: ListenRequest{Network: "tcp", Address: "127.0.0.1:80"}, want: Key{Network: "tcp4", Address: "127.0.0.1:80"}},
		{name: "ipv4 literal on tcp4", req: ListenRequest{Network: "tcp4", Address: "127.0.0.1:80"}, want: Key{Network: "tcp4", Address: "127.0.0.1:80"}},
		{name: "mapped ipv4", req: ListenRequest{Network: "tcp", Address: "[::ffff:127.0.0.1]:80"}, want: Key{Network: "tcp4", Address: "127.0.0.1:80"}},
		{name: "ipv6 loopback", req: ListenRequest{Network: "tcp", Address: "[::1]:80"}, want: Key{Network: "tcp6", Address: "[::1]:80"}},
		{name: "service name", req: ListenRequest{Network: "tcp", Address: "127.0.0.1:http"}, want: Key{Network: "tcp4", Address: "127.0.0.1:80"}},
		{name: "host name", req: ListenRequest{Network: "tcp", Address: "localhost:0", Index: 2}, want: Key{Network: "tcp4", Address: "127.0.0.1:0", Index: 2}},
		{name: "udp", req: ListenRequest{Network: "udp", Address: "127.0.0.1:53", Packet: true}, want: Key{Network: "udp4", Address: "127.0.0.1:53", Packet: true}},
		{name: "unix cleaned", req: ListenRequest{Network: "unix", Address: "/tmp//a/../b.sock"}, want: Key{Network: "unix", Address: "/tmp/b.sock"}},
		{name: "unix abstract", req: ListenRequest{Network: "unix", Address: "@gorolling"}, want: Key{Network: "unix", Address: "@gorolling"}},
		{name: "unixgram", req: ListenRequest{Network: "unixgram", Address: "/tmp/g.sock", Packet: true}, want: Key{Network: "unixgram", Address: "/tmp/g.sock", Packet: true}},
		{name: "fd", req: ListenRequest{FD: intp(7), Index: 3}, want: Key{Network: "fd", Address: "7"}},
		{name: "relative unix", req: ListenRequest{Network: "unix", Address: "x.sock"}, wantErr: true},
		{name: "bad port", req: ListenRequest{Network: "tcp", Address: ":99999"}, wantErr: true},
		{name: "v6 on tcp4", req: ListenRequest{Network: "tcp4", Address: "[::1]:80"}, wantErr: true},
		{name: "udp without packet", req: ListenRequest{Network: "udp", Address: ":1"}, wantErr: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Normalize(&tc.req)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("got %v, want an error", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestErrnoNames(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, err = net.Listen("tcp", l.Addr().String())
	name := ErrnoName(err)
	if name != "EADDRINUSE" {
		t.Fatalf("ErrnoName(%v) = %q", err, name)
	}
	e, ok := ErrnoValue(name)
	if !ok || e != unix.EADDRINUSE {
		t.Fatalf("ErrnoValue(%q) = %v %v", name, e, ok)
	}
	if ErrnoName(errors.New("plain")) != "" {
		t.Fatal("name for a non-errno error")
	}
}

// sockets returns n new TCP sockets; the test closes them.
func sockets(t *testing.T, n int) []int {
	t.Helper()
	var out []int
	for i := 0; i < n; i++ {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, fd)
	}
	return out
}

func rawOf(t *testing.T, f *os.File) int {
	t.Helper()
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	fd := -1
	rc.Control(func(x uintptr) { fd = int(x) })
	return fd
}

// TestBundleStream: 2,000 sockets and a large state pass through a stream
// whose send buffer is as small as the kernel allows, because the receiver
// reads while the sender sends; the receiver's answer comes back; nothing
// leaks.
func TestBundleStream(t *testing.T) {
	before := openFDs(t)
	keep, give, err := Rendezvous()
	if err != nil {
		t.Fatal(err)
	}
	socks := sockets(t, 2000)
	type meta struct {
		Gen  int
		Pad  string
		Keys []string
	}
	m := meta{Gen: 7, Pad: strings.Repeat("x", 200<<10)}
	for i := 0; i < 2000; i++ {
		m.Keys = append(m.Keys, strings.Repeat("k", 100))
	}
	stream, err := OpenStream(rawOf(t, keep), 1)
	if err != nil {
		t.Fatal(err)
	}
	sent := make(chan error, 1)
	go func() { sent <- SendBundle(stream, m, socks, 5*time.Second, nil) }()
	var got meta
	fds, reply, err := ReceiveBundle(rawOf(t, give), &got)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if got.Gen != 7 || len(got.Pad) != len(m.Pad) || len(got.Keys) != 2000 || len(fds) != 2000 {
		t.Fatalf("got gen %d, %d bytes of padding, %d keys, %d fds", got.Gen, len(got.Pad), len(got.Keys), len(fds))
	}
	for i, fd := range fds {
		var a, b unix.Stat_t
		unix.Fstat(fd, &a)
		unix.Fstat(socks[i], &b)
		if a.Ino != b.Ino {
			t.Fatalf("socket %d arrived out of order", i)
		}
	}
	if err := Reply(reply, []byte(`{"pid":42}`)); err != nil {
		t.Fatal(err)
	}
	if r := string(ReadReply(stream)); r != `{"pid":42}` {
		t.Fatalf("reply %q", r)
	}
	unix.Close(reply)
	unix.Close(stream)
	closeAll(fds)
	closeAll(socks)
	keep.Close()
	give.Close()
	if after := openFDs(t); after != before {
		t.Fatalf("fd count %d, want %d", after, before)
	}
}

// TestBundleStalledReceiver: a receiver that reads nothing makes the
// sender give up after its idle bound, and abort stops it at once.
func TestBundleStalledReceiver(t *testing.T) {
	keep, give, err := Rendezvous()
	if err != nil {
		t.Fatal(err)
	}
	defer keep.Close()
	defer give.Close()
	socks := sockets(t, 500)
	defer closeAll(socks)
	stream, err := OpenStream(rawOf(t, keep), 1)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(stream)
	start := time.Now()
	err = SendBundle(stream, struct{}{}, socks, 300*time.Millisecond, nil)
	if err == nil || !strings.Contains(err.Error(), "read nothing") {
		t.Fatalf("stalled receiver: %v", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("gave up after %s", d)
	}
	abort := make(chan struct{})
	close(abort)
	if err := SendBundle(stream, struct{}{}, socks, time.Hour, abort); err == nil || !strings.Contains(err.Error(), "went away") {
		t.Fatalf("aborted send: %v", err)
	}
	// What was queued is released.
	DiscardBundle(rawOf(t, give))
}

// TestBundleVersion1: a bundle from an older master (state inline, one fd
// per record, straight on the rendezvous) is still understood.
func TestBundleVersion1(t *testing.T) {
	keep, give, err := Rendezvous()
	if err != nil {
		t.Fatal(err)
	}
	defer keep.Close()
	defer give.Close()
	socks := sockets(t, 3)
	defer closeAll(socks)
	k := rawOf(t, keep)
	unix.Sendmsg(k, []byte(`{"v":1,"type":"bundle","fds":3,"meta":{"Gen":5}}`), nil, nil, 0)
	for i, fd := range socks {
		unix.Sendmsg(k, []byte(fmt.Sprintf(`{"v":1,"type":"fd","index":%d}`, i)), unix.UnixRights(fd), nil, 0)
	}
	var got struct{ Gen int }
	fds, reply, err := ReceiveBundle(rawOf(t, give), &got)
	if err != nil {
		t.Fatal(err)
	}
	defer closeAll(fds)
	if got.Gen != 5 || len(fds) != 3 || reply != rawOf(t, give) {
		t.Fatalf("gen %d, %d fds, reply fd %d", got.Gen, len(fds), reply)
	}
}

// TestBundleMalformed: a bad record fails the receive and leaks nothing.
func TestBundleMalformed(t *testing.T) {
	before := openFDs(t)
	for _, recs := range [][]string{
		{`{"v":1,"type":"bundle","fds":2,"meta":{}}`, `{"v":1,"type":"fd","index":1}`},
		{`{"v":2,"type":"bundle","fds":0}`},
		{`{"v":1,"type":"bundle","fds":1,"meta_len":3}`, `{}x`},
		{`{"v":1,"type":"bundle","fds":99999999}`},
	} {
		keep, give, err := Rendezvous()
		if err != nil {
			t.Fatal(err)
		}
		fd := sockets(t, 1)[0]
		for _, r := range recs {
			unix.Sendmsg(rawOf(t, keep), []byte(r), unix.UnixRights(fd), nil, 0)
		}
		unix.Close(fd)
		keep.Close() // the receiver sees the end instead of waiting
		var m struct{}
		if _, _, err := ReceiveBundle(rawOf(t, give), &m); !errors.Is(err, ErrBundle) {
			t.Errorf("records %q: %v, want ErrBundle", recs, err)
		}
		DiscardBundle(rawOf(t, give))
		give.Close()
	}
	if after := openFDs(t); after != before {
		t.Fatalf("fd count %d, want %d", after, before)
	}
}

// TestDiscardNeverBlocks: the last close of a TCP socket with unsent data,
// a peer that reads nothing and a long SO_LINGER would block for the
// linger time; a hostile worker can hand the master exactly that. Discard
// returns at once and leaves no descriptor behind.
func TestDiscardNeverBlocks(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close() // never accepts: the connection's window closes
	before := openFDs(t)
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a := l.Addr().(*net.TCPAddr)
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: a.Port, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	unix.SetNonblock(fd, true)
	buf := make([]byte, 1<<16)
	for i := 0; i < 1000; i++ {
		if _, err := unix.Write(fd, buf); err != nil {
			break // the send buffer is full
		}
	}
	if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 3600}); err != nil {
		t.Fatal(err)
	}
	unix.SetNonblock(fd, false)
	start := time.Now()
	Discard([]int{fd})
	if d := time.Since(start); d > time.Second {
		t.Fatalf("Discard blocked for %s", d)
	}
	if after := openFDs(t); after != before {
		t.Fatalf("fd count %d, want %d", after, before)
	}
}
