package worker

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorolling/gorolling/handoff"
)

// fakeMaster answers the worker package's requests over a real handoff
// channel, the way the master does: one socket per key, a duplicate per
// request, the real errno on failure.
type fakeMaster struct {
	conn *handoff.Conn

	mu      sync.Mutex
	sockets map[handoff.Key]net.Listener
	ready   int
	asked   []handoff.Key
}

var fm *fakeMaster

func TestMain(m *testing.M) {
	conn, wf, err := handoff.Pair()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Give the worker side its own descriptor number, as exec would.
	fd, err := syscall.Dup(int(wf.Fd()))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	wf.Close()
	channelFD = fd
	slot, workerID, generation = 2, 7, 3
	fm = &fakeMaster{conn: conn, sockets: map[handoff.Key]net.Listener{}}
	go fm.serve()
	os.Exit(m.Run())
}

func (f *fakeMaster) serve() {
	for {
		msg, fds, err := f.conn.Receive()
		if err != nil {
			return
		}
		for _, fd := range fds {
			syscall.Close(fd)
		}
		reply := &handoff.Message{V: handoff.Version, Type: handoff.TypeReply, ReplyTo: msg.Seq}
		switch msg.Type {
		case handoff.TypeReady:
			f.mu.Lock()
			f.ready++
			f.mu.Unlock()
			f.conn.Send(reply)
		case handoff.TypeListen:
			k, err := handoff.Normalize(msg.Listen)
			if err != nil {
				reply.Error = err.Error()
				f.conn.Send(reply)
				continue
			}
			f.mu.Lock()
			f.asked = append(f.asked, k)
			l := f.sockets[k]
			if l == nil {
				l, err = net.Listen(k.Network, k.Address)
				if err != nil {
					f.mu.Unlock()
					reply.Error, reply.Errno = err.Error(), handoff.ErrnoName(err)
					f.conn.Send(reply)
					continue
				}
				f.sockets[k] = l
			}
			f.mu.Unlock()
			reply.Network, reply.Address = l.Addr().Network(), l.Addr().String()
			rc, _ := l.(syscall.Conn).SyscallConn()
			rc.Control(func(fd uintptr) { f.conn.Send(reply, int(fd)) })
		default:
			f.conn.Send(reply)
		}
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestIdentity(t *testing.T) {
	if !IsWorker() || Slot() != 2 || ID() != 7 || Generation() != 3 {
		t.Fatalf("IsWorker %v Slot %d ID %d Generation %d", IsWorker(), Slot(), ID(), Generation())
	}
}

func TestListenPortZeroIndexAndFDs(t *testing.T) {
	// Warm up: the first call connects to the master and starts the poller.
	if err := Ready(); err != nil {
		t.Fatal(err)
	}
	fm.mu.Lock()
	held := len(fm.sockets) // the fake master's own sockets live in this process
	fm.mu.Unlock()
	before := openFDs(t)
	a, err := Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b, err := Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if a.Addr().String() == b.Addr().String() {
		t.Fatalf("two port-0 listens share %s", a.Addr())
	}
	// Closing the first frees index 0: listening again gets its socket.
	aAddr := a.Addr().String()
	a.Close()
	a2, err := Listen("tcp", "localhost:0")
	if err != nil {
		t.Fatal(err)
	}
	if a2.Addr().String() != aAddr {
		t.Fatalf("re-listen got %s, want %s (index 0 again)", a2.Addr(), aAddr)
	}
	// The listener accepts: the socket is non-blocking and usable.
	dialed := make(chan struct{})
	go func() {
		defer close(dialed)
		c, err := net.Dial("tcp", aAddr)
		if err == nil {
			c.Close()
		}
	}()
	c, err := a2.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	<-dialed
	a2.Close()
	b.Close()
	fm.mu.Lock()
	held = len(fm.sockets) - held
	fm.mu.Unlock()
	if after := openFDs(t) - held; after != before {
		t.Fatalf("%d fds open after Listen and Close, %d before (PITFALLS #8)", after, before)
	}
}

func TestListenErrno(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	_, err = Listen("tcp", busy.Addr().String())
	if !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("err %v, want EADDRINUSE", err)
	}
	var le *ListenError
	if !errors.As(err, &le) || !strings.Contains(le.Error(), "address already in use") {
		t.Fatalf("err %#v", err)
	}
	if _, err := ListenPacket("tcp", "127.0.0.1:0"); err == nil {
		t.Fatal("ListenPacket on tcp succeeded")
	}
}

func TestListenExclusiveDoesNotAsk(t *testing.T) {
	fm.mu.Lock()
	n := len(fm.asked)
	fm.mu.Unlock()
	lc := ListenConfig{Exclusive: true}
	l, err := lc.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	fm.mu.Lock()
	defer fm.mu.Unlock()
	if len(fm.asked) != n {
		t.Fatal("an exclusive listen asked the master")
	}
}

func TestListenUnixRelative(t *testing.T) {
	dir := t.TempDir()
	wd, _ := os.Getwd()
	os.Chdir(dir)
	defer os.Chdir(wd)
	l, err := Listen("unix", "w.sock")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fm.mu.Lock()
	last := fm.asked[len(fm.asked)-1]
	fm.mu.Unlock()
	if want := dir + "/w.sock"; last.Address != want {
		t.Fatalf("master asked for %q, want %q", last.Address, want)
	}
}

// TestServeHTTPDrain runs last among the tests that need a live master: it
// drains the package for good.
func TestServeHTTPDrain(t *testing.T) {
	select {
	case <-drain.ch:
		t.Skip("this process has drained already (drain state lives for the process; -count > 1)")
	default:
	}
	l, err := Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	})}
	done := make(chan error, 1)
	go func() { done <- ServeHTTPWith(srv, HTTPOptions{Grace: 2 * time.Second}, l) }()

	// A keep-alive client that never retries.
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	br := bufio.NewReader(conn)
	post := func() *http.Response {
		t.Helper()
		fmt.Fprintf(conn, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("request failed: %v", err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}
	if r := post(); r.Close {
		t.Fatal("Connection: close before the drain")
	}
	// The master says drain.
	fm.conn.Send(&handoff.Message{V: handoff.Version, Type: handoff.TypeDrain, TimeoutMS: 10000})
	select {
	case <-Draining():
	case <-time.After(5 * time.Second):
		t.Fatal("drain message did not close Draining")
	}
	if d := time.Until(DrainDeadline()); d <= 0 || d > 10*time.Second {
		t.Fatalf("drain deadline in %s", d)
	}
	time.Sleep(50 * time.Millisecond)
	// The kept-alive connection still gets its answer, with Connection: close.
	if r := post(); !r.Close {
		t.Fatal("no Connection: close while draining")
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ServeHTTP: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServeHTTP did not return after its client left")
	}
	// The master's copy still holds the socket: it accepts.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("shared socket closed by the drain: %v", err)
	}
	c.Close()
}
