package worker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
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
	// offers says whether the master relays connections, and what it does
	// with an offer.
	offers offerMode
}

// offerMode is what the fake master does with connection offers.
type offerMode int

const (
	noRelay    offerMode = iota // the master does not relay connections
	takeOffers                  // it relays, and takes every offer
	dieOnOffer                  // it relays, and dies holding the first offer
)

// newWorker returns a worker process state of its own, connected to a fake
// master over a real handoff channel: tests share nothing.
func newWorker(t *testing.T) (*proc, *fakeMaster) {
	t.Helper()
	conn, wf, err := handoff.Pair()
	if err != nil {
		t.Fatal(err)
	}
	// Give the worker side its own descriptor number, as exec would.
	fd, err := syscall.Dup(int(wf.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	wf.Close()
	env := map[string]string{EnvFD: strconv.Itoa(fd), EnvSlot: "2", EnvWorkerID: "7", EnvGeneration: "3"}
	p := newProc(func(k string) string { return env[k] }, false)
	fm := &fakeMaster{conn: conn, sockets: map[handoff.Key]net.Listener{}}
	go fm.serve()
	t.Cleanup(func() {
		conn.Close()
		if p.c != nil {
			p.c.conn.Close()
		}
		fm.mu.Lock()
		for _, l := range fm.sockets {
			l.Close()
		}
		fm.mu.Unlock()
	})
	return p, fm
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
		f.mu.Lock()
		offers := f.offers
		f.mu.Unlock()
		switch msg.Type {
		case handoff.TypeHello:
			if offers != noRelay {
				reply.Features = []string{handoff.FeatureConns}
			}
			f.conn.Send(reply)
		case handoff.TypeHandoff:
			if offers == dieOnOffer {
				f.conn.Close()
				return
			}
			f.conn.Send(reply)
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
			reply.Network, reply.Address, reply.Key = l.Addr().Network(), l.Addr().String(), k.String()
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

// listen is Listen through p.
func listen(p *proc, network, address string) (net.Listener, error) {
	x, err := p.listen(context.Background(), &ListenConfig{}, network, address, false)
	if err != nil {
		return nil, err
	}
	return x.(net.Listener), nil
}

func TestIdentity(t *testing.T) {
	p, _ := newWorker(t)
	p.setup()
	if p.chanFD < 0 || p.slot != 2 || p.id != 7 || p.gen != 3 {
		t.Fatalf("worker: fd %d slot %d id %d generation %d", p.chanFD, p.slot, p.id, p.gen)
	}
	// The test process itself was not started by gorolling.
	if IsWorker() || Slot() != -1 || ID() != 0 || Generation() != 0 {
		t.Fatalf("standalone: IsWorker %v Slot %d ID %d Generation %d", IsWorker(), Slot(), ID(), Generation())
	}
}

func TestListenPortZeroIndexAndFDs(t *testing.T) {
	p, fm := newWorker(t)
	// Warm up: the first call connects to the master and starts the poller.
	if err := p.ready(); err != nil {
		t.Fatal(err)
	}
	fm.mu.Lock()
	held := len(fm.sockets) // the fake master's own sockets live in this process
	fm.mu.Unlock()
	before := openFDs(t)
	a, err := listen(p, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b, err := listen(p, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if a.Addr().String() == b.Addr().String() {
		t.Fatalf("two port-0 listens share %s", a.Addr())
	}
	// Closing the first frees index 0: listening again gets its socket.
	aAddr := a.Addr().String()
	a.Close()
	a2, err := listen(p, "tcp", "localhost:0")
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
	// A File kept after conversion would keep the socket open.
	if after := openFDs(t) - held; after != before {
		t.Fatalf("%d fds open after Listen and Close, %d before", after, before)
	}
}

// TestListenErrors: every listen error is a *net.OpError whose Err unwraps
// to the errno, under a master and standalone.
func TestListenErrors(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	p, _ := newWorker(t)
	standalone := newProc(func(string) string { return "" }, false)
	for _, tc := range []struct {
		name  string
		call  func() error
		errno syscall.Errno
	}{
		{"master: address in use", func() error { _, err := listen(p, "tcp", busy.Addr().String()); return err }, syscall.EADDRINUSE},
		{"standalone: address in use", func() error { _, err := listen(standalone, "tcp", busy.Addr().String()); return err }, syscall.EADDRINUSE},
		{"master: bad address", func() error { _, err := listen(p, "tcp", "no-such-host.invalid:1"); return err }, syscall.EINVAL},
		{"master: packet on tcp", func() error {
			_, err := p.listen(context.Background(), &ListenConfig{}, "tcp", "127.0.0.1:0", true)
			return err
		}, syscall.EPROTOTYPE},
		{"master: relative unix path outside the worker", func() error { _, err := listen(p, "unix", ""); return err }, syscall.EINVAL},
		{"standalone: fd that is no socket", func() error { _, err := standalone.listenFD(context.Background(), 0, false); return err }, syscall.ENOTSOCK},
		{"standalone: negative fd", func() error { _, err := standalone.listenFD(context.Background(), -1, false); return err }, syscall.EBADF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			var oe *net.OpError
			if !errors.As(err, &oe) || oe.Op != "listen" {
				t.Fatalf("err %#v is not a *net.OpError", err)
			}
			if !errors.Is(err, tc.errno) {
				t.Fatalf("err %v does not unwrap to %v", err, tc.errno)
			}
		})
	}
}

func TestListenExclusiveDoesNotAsk(t *testing.T) {
	p, fm := newWorker(t)
	x, err := p.listen(t.Context(), &ListenConfig{Exclusive: true}, "tcp", "127.0.0.1:0", false)
	if err != nil {
		t.Fatal(err)
	}
	x.(net.Listener).Close()
	fm.mu.Lock()
	defer fm.mu.Unlock()
	if len(fm.asked) != 0 {
		t.Fatal("an exclusive listen asked the master")
	}
}

func TestListenUnixRelative(t *testing.T) {
	p, fm := newWorker(t)
	dir := t.TempDir()
	t.Chdir(dir)
	l, err := listen(p, "unix", "w.sock")
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

// TestServeHTTPDrain: on the master's drain, a kept-alive connection gets
// its answer with Connection: close, ServeHTTP returns once the client is
// gone, and the master's copy of the socket still accepts.
func TestServeHTTPDrain(t *testing.T) {
	p, fm := newWorker(t)
	l, err := listen(p, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	})}
	done := make(chan error, 1)
	go func() { done <- p.serveHTTP(srv, HTTPOptions{Grace: 2 * time.Second, OwnSignals: true}, l) }()

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
	fm.conn.Send(&handoff.Message{V: handoff.Version, Type: handoff.TypeDrain, TimeoutMS: 10000})
	select {
	case <-p.draining():
	case <-time.After(5 * time.Second):
		t.Fatal("drain message did not close Draining")
	}
	if d := time.Until(p.drainDeadline()); d <= 0 || d > 10*time.Second {
		t.Fatalf("drain deadline in %s", d)
	}
	time.Sleep(50 * time.Millisecond)
	if r := post(); !r.Close {
		t.Fatal("no Connection: close while draining")
	}
	conn.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("ServeHTTP: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServeHTTP did not return after its client left")
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("shared socket closed by the drain: %v", err)
	}
	c.Close()
}

// TestServeHTTPReturnsShutdownError: a request that outlives the drain
// deadline makes ServeHTTP return Shutdown's error.
func TestServeHTTPReturnsShutdownError(t *testing.T) {
	p, fm := newWorker(t)
	l, err := listen(p, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	defer close(release)
	started := make(chan struct{}, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		<-release
	})}
	done := make(chan error, 1)
	go func() { done <- p.serveHTTP(srv, HTTPOptions{Grace: 10 * time.Millisecond, OwnSignals: true}, l) }()
	go http.Get("http://" + l.Addr().String() + "/")
	<-started
	fm.conn.Send(&handoff.Message{V: handoff.Version, Type: handoff.TypeDrain, TimeoutMS: 300})
	select {
	case err := <-done:
		if err == nil || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("ServeHTTP returned %v, want the Shutdown deadline error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServeHTTP did not return")
	}
}

// TestMasterGoneDrains: when the master's end closes, the worker drains
// with the default deadline, and requests fail with EPIPE.
func TestMasterGoneDrains(t *testing.T) {
	p, fm := newWorker(t)
	if err := p.ready(); err != nil {
		t.Fatal(err)
	}
	fm.conn.Close()
	select {
	case <-p.draining():
	case <-time.After(5 * time.Second):
		t.Fatal("the master's death did not start a drain")
	}
	if _, err := listen(p, "tcp", "127.0.0.1:0"); !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("listen after the master died: %v", err)
	}
}

// TestHandOffUnansweredCloses: a master that dies holding an offer may
// have given the connection to another worker already. HandOff must then
// close this copy (ErrHandOffUnknown), not hand it back for serving
// (ErrNotHandedOver), or two workers could answer the same client.
func TestHandOffUnansweredCloses(t *testing.T) {
	p, sc := handOffWorker(t, dieOnOffer)
	err := p.handOff(sc, []byte("state"), nil)
	if !errors.Is(err, ErrHandOffUnknown) || errors.Is(err, ErrNotHandedOver) {
		t.Fatalf("hand-off to a master that died holding it: %v; want ErrHandOffUnknown, not ErrNotHandedOver", err)
	}
	if _, err := sc.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("the connection is still open here after an unanswered offer (write: %v)", err)
	}
}

// TestHandOffHijacked: a connection ServeHTTP's handler hijacked (a
// WebSocket after its handshake) reaches the handler wrapped; HandOff can
// still give its socket to the master.
func TestHandOffHijacked(t *testing.T) {
	p, sc := handOffWorker(t, takeOffers)
	if err := p.handOff(&httpConn{Conn: sc}, []byte("ws state"), nil); err != nil {
		t.Fatalf("hand-off of a hijacked connection: %v", err)
	}
}

// handOffWorker returns a worker whose fake master treats offers as mode
// says, and the server side of a loopback connection accepted from a
// listener that master gave it.
func handOffWorker(t *testing.T, mode offerMode) (*proc, net.Conn) {
	t.Helper()
	p, fm := newWorker(t)
	fm.mu.Lock()
	fm.offers = mode
	fm.mu.Unlock()
	l, err := listen(p, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	client, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	sc, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	return p, sc
}
