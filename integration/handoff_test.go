package integration

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorolling/gorolling/master/events"
)

// Connection hand-off: a draining generation's connections move to the
// next one instead of being closed.

// handoffRequest bounds one request or line of the hand-off tests' clients
// (a slower answer fails the test). A request that arrives while its
// connection is in transit waits for the move: at most the master's relay
// bound (1 s) and the adopter's accept bound (0.5 s) before the connection
// goes back to its sender, which answers; the rest is room for a
// race-enabled build on two CPUs.
const handoffRequest = 3 * time.Second

// waitFDs waits until the master has want descriptors open.
func waitFDs(t *testing.T, pid, want int, when string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	got := fdCount(t, pid)
	for got != want && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		got = fdCount(t, pid)
	}
	if got != want {
		t.Fatalf("%s: the master has %d descriptors open, %d before (kinds now: %v)", when, got, want, fdKinds(t, pid))
	}
}

// poolClient is one pooled keep-alive connection that is reused after
// idle gaps, as a load balancer's pool or a client library reuses it. It
// never retries: every error is a failure.
type poolStats struct {
	mu        sync.Mutex
	ok        int
	failures  []string
	moved     int // answered by a newer generation than the last answer on the same connection
	closed    int // connections the server closed (probe saw EOF, or Connection: close)
	reconnect int
}

func (s *poolStats) fail(f string) {
	s.mu.Lock()
	s.failures = append(s.failures, f)
	s.mu.Unlock()
}

// poolClient runs until stop, sleeping a random gap in [minGap, maxGap)
// before each request. With probe it checks, before writing, whether the
// server closed the connection (a non-blocking read), as real pools do.
func poolClient(addr string, minGap, maxGap time.Duration, probe bool, stop <-chan struct{}, st *poolStats, wg *sync.WaitGroup) {
	defer wg.Done()
	var conn net.Conn
	var br *bufio.Reader
	lastGen := 0
	drop := func() {
		if conn != nil {
			conn.Close()
		}
		conn, br, lastGen = nil, nil, 0
	}
	defer drop()
	for {
		gap := minGap + time.Duration(rand.Int64N(int64(maxGap-minGap)))
		select {
		case <-stop:
			return
		case <-time.After(gap):
		}
		if conn != nil && probe {
			conn.SetReadDeadline(time.Now().Add(time.Millisecond))
			var b [1]byte
			_, err := conn.Read(b[:])
			if err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
				st.mu.Lock()
				st.closed++
				st.mu.Unlock()
				drop()
			}
		}
		if conn == nil {
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				st.fail("dial: " + err.Error())
				continue
			}
			conn, br = c, bufio.NewReader(c)
			st.mu.Lock()
			st.reconnect++
			st.mu.Unlock()
		}
		conn.SetDeadline(time.Now().Add(handoffRequest))
		if _, err := io.WriteString(conn, "GET / HTTP/1.1\r\nHost: pool\r\n\r\n"); err != nil {
			st.fail("write: " + err.Error())
			drop()
			continue
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			st.fail(fmt.Sprintf("read (last generation on the connection %d): %v", lastGen, err))
			drop()
			continue
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			st.fail("status " + resp.Status)
			drop()
			continue
		}
		gen, _ := strconv.Atoi(resp.Header.Get("X-Generation"))
		st.mu.Lock()
		st.ok++
		if lastGen != 0 && gen > lastGen {
			st.moved++
		}
		if resp.Close {
			st.closed++
		}
		st.mu.Unlock()
		lastGen = gen
		if resp.Close {
			drop()
		}
	}
}

// TestHandoffIdlePool: 48 pooled connections reused after random idle gaps
// of 0.2-4 s, through 12 HUPs, with clients that probe for a close before
// writing and with clients that do not. No request fails, no connection is
// closed by the server, connections are answered by newer generations,
// and the master's descriptor count is back at its baseline after every
// upgrade.
func TestHandoffIdlePool(t *testing.T) {
	for _, probe := range []bool{false, true} {
		t.Run(map[bool]string{false: "no-probe", true: "probe"}[probe], func(t *testing.T) {
			p, addr := exampleMaster(t, 2)
			baseline := fdCount(t, p.pid)
			st := &poolStats{}
			stop := make(chan struct{})
			var wg sync.WaitGroup
			for i := 0; i < 48; i++ {
				wg.Add(1)
				go poolClient(addr, 200*time.Millisecond, 4*time.Second, probe, stop, st, &wg)
			}
			stopped := false
			halt := func() {
				if !stopped {
					stopped = true
					close(stop)
					wg.Wait()
				}
			}
			defer halt()
			time.Sleep(2 * time.Second)
			for i := 0; i < 12; i++ {
				p.upgrade(60 * time.Second)
				waitFDs(t, p.pid, baseline, fmt.Sprintf("after upgrade %d", i+1))
				time.Sleep(500 * time.Millisecond)
			}
			time.Sleep(4 * time.Second)
			halt()
			s := masterStatus(t, p)
			st.mu.Lock()
			defer st.mu.Unlock()
			t.Logf("%d requests ok, %d failed; %d answered by a newer generation on a connection an older one answered; %d closed by the server; %d connections opened; master: %d handed over, %d returned",
				st.ok, len(st.failures), st.moved, st.closed, st.reconnect, s.ConnsHandedOver, s.ConnsReturned)
			for i, f := range st.failures {
				if i < 10 {
					t.Errorf("failed: %s", f)
				}
			}
			if len(st.failures) > 0 {
				t.Fatalf("%d of %d requests failed", len(st.failures), st.ok+len(st.failures))
			}
			if st.moved == 0 {
				t.Fatal("no connection was answered by a newer generation: nothing was handed over")
			}
			if st.closed != 0 {
				t.Fatalf("the server closed %d connections; hand-off should close none", st.closed)
			}
			if st.reconnect != 48 {
				t.Fatalf("%d connections opened for 48 clients", st.reconnect)
			}
		})
	}
}

// TestHandoffExactlyOnce: requests whose bytes arrive while their
// connection is being handed over are answered exactly once. The server
// logs every request id it answers; each must appear once, and each
// client must get exactly one answer per id.
func TestHandoffExactlyOnce(t *testing.T) {
	logPath := filepath.Join(t.TempDir(), "requests.log")
	p, addr := exampleMaster(t, 2, "-request-log", logPath)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	sent := map[string]int{}
	var failures []string
	for c := 0; c < 32; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				mu.Lock()
				failures = append(failures, err.Error())
				mu.Unlock()
				return
			}
			defer conn.Close()
			br := bufio.NewReader(conn)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-time.After(time.Duration(rand.IntN(20)) * time.Millisecond):
				}
				id := fmt.Sprintf("c%d-%d", c, i)
				conn.SetDeadline(time.Now().Add(handoffRequest))
				_, err := fmt.Fprintf(conn, "POST / HTTP/1.1\r\nHost: once\r\nX-Request-Id: %s\r\nContent-Length: 5\r\n\r\nhello", id)
				var resp *http.Response
				if err == nil {
					resp, err = http.ReadResponse(br, nil)
				}
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK || resp.Close {
						err = fmt.Errorf("status %s, close %v", resp.Status, resp.Close)
					}
				}
				mu.Lock()
				if err != nil {
					failures = append(failures, id+": "+err.Error())
					mu.Unlock()
					return
				}
				sent[id]++
				mu.Unlock()
			}
		}()
	}
	time.Sleep(500 * time.Millisecond)
	for i := 0; i < 10; i++ {
		p.upgrade(60 * time.Second)
		time.Sleep(300 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	b, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	served := map[string]int{}
	gens := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			t.Fatalf("bad request log line %q", line)
		}
		id, _ := strconv.Unquote(f[0])
		served[id]++
		gens[f[2]] = true
	}
	for i, f := range failures {
		if i < 10 {
			t.Errorf("failed: %s", f)
		}
	}
	if len(failures) > 0 {
		t.Fatalf("%d requests failed", len(failures))
	}
	twice := 0
	for id, n := range served {
		if n != 1 {
			twice++
			if twice < 10 {
				t.Errorf("request %s was served %d times", id, n)
			}
		}
		if sent[id] != 1 {
			t.Errorf("request %s was served but its client got %d answers", id, sent[id])
		}
	}
	for id := range sent {
		if served[id] == 0 {
			t.Errorf("request %s was answered but the server never logged it", id)
		}
	}
	t.Logf("%d requests, each served once, by generations %v; master: %d handed over", len(sent), len(gens), masterStatus(t, p).ConnsHandedOver)
	if len(gens) < 11 {
		t.Fatalf("requests were served by %d generations, want 11: the connections did not move", len(gens))
	}
}

// TestHandoffLineProtocol: 20 clients of the chat example, each sending a
// line every 100 ms through 10 HUPs, stay connected; each client's state
// (its line count) carries over, and at the end every client is answered
// by the last generation.
func TestHandoffLineProtocol(t *testing.T) {
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	p := startMaster(t, masterOpts{args: []string{"-w", "2", "--", binPath("chat"), "-listen", addr}})
	p.waitServing()
	type client struct {
		conn net.Conn
		br   *bufio.Reader
		n    int
		gen  int
		err  error
	}
	clients := make([]*client, 20)
	for i := range clients {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		cl := &client{conn: c, br: bufio.NewReader(c)}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if line, err := cl.br.ReadString('\n'); err != nil || !strings.HasPrefix(line, "hello gen=") {
			t.Fatalf("greeting %q, %v", line, err)
		}
		clients[i] = cl
	}
	// say sends one line and checks the answer: the next line count, the
	// nick set at the start.
	say := func(i int, cl *client, text string) error {
		cl.conn.SetDeadline(time.Now().Add(handoffRequest))
		if _, err := fmt.Fprintf(cl.conn, "%s\n", text); err != nil {
			return err
		}
		line, err := cl.br.ReadString('\n')
		if err != nil {
			return fmt.Errorf("after %d lines: %w", cl.n, err)
		}
		cl.n++
		var gen, pid, n int
		var nick, rest string
		if _, err := fmt.Sscanf(line, "gen=%d pid=%d nick=%s n=%d: %s", &gen, &pid, &nick, &n, &rest); err != nil {
			return fmt.Errorf("answer %q: %v", line, err)
		}
		if n != cl.n || nick != fmt.Sprintf("c%d", i) {
			return fmt.Errorf("answer %q: want n=%d nick=c%d (the state did not carry over)", line, cl.n, i)
		}
		cl.gen = gen
		return nil
	}
	for i, cl := range clients {
		if err := say(i, cl, fmt.Sprintf("/nick c%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, cl := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				if err := say(i, cl, "ping"); err != nil {
					cl.err = err
					return
				}
			}
		}()
	}
	last := 1
	for i := 0; i < 10; i++ {
		time.Sleep(300 * time.Millisecond)
		last = p.upgrade(60 * time.Second)
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	for i, cl := range clients {
		if cl.err != nil {
			t.Fatalf("client %d: %v", i, cl.err)
		}
		if err := say(i, cl, "last"); err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
		if cl.gen != last {
			t.Fatalf("client %d was answered by generation %d at the end, want %d", i, cl.gen, last)
		}
	}
	t.Logf("20 clients, %d lines each, connected through 10 upgrades; master: %d handed over", clients[0].n, masterStatus(t, p).ConnsHandedOver)
}

// TestHandoffFallback: a generation that does not adopt connections (the
// Python example) takes over from the Go example; the Go workers cannot
// hand over and drain the old way, with no failed request; so does a
// Go generation run with -no-handoff.
func TestHandoffFallback(t *testing.T) {
	py := requireTool(t, "python3")
	dir := t.TempDir()
	port := freePort(t)
	app := filepath.Join(dir, "app")
	write := func(script string) {
		tmp := app + ".new"
		if err := os.WriteFile(tmp, []byte("#!/bin/sh\n"+script+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, app); err != nil {
			t.Fatal(err)
		}
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	write("exec " + binPath("example-server") + " -listen " + addr)
	p := startMaster(t, masterOpts{args: []string{"-w", "2", "--listen", "tcp://" + addr, "--", app}})
	p.waitServing()
	waitHTTP(t, addr, 10*time.Second)
	for _, next := range []string{
		"DRAIN_GRACE=0.5 exec " + py + " " + examplePath(t, "python/server.py"),
		"exec " + binPath("example-server") + " -listen " + addr + " -no-handoff",
		"exec " + binPath("example-server") + " -listen " + addr,
	} {
		l := startLoad(t, addr, 32, true)
		time.Sleep(500 * time.Millisecond)
		write(next)
		p.upgrade(60 * time.Second)
		time.Sleep(500 * time.Millisecond)
		l.requireNoFailures(t)
	}
	s := masterStatus(t, p)
	t.Logf("master: %d handed over, %d returned", s.ConnsHandedOver, s.ConnsReturned)
}

// TestHandoffAdopterFails: the serving generation announces that it adopts
// connections but never takes them (it hangs, or it declines). The master
// gives every connection back to its sender within its bound, the sender
// finishes it the old way, and no request fails.
func TestHandoffAdopterFails(t *testing.T) {
	for _, mode := range []string{"hang", "refuse"} {
		t.Run(mode, func(t *testing.T) {
			addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
			p, reports := twMaster(t, 2, "gen1:listen tcp "+addr+"; gen2:rawadopter "+mode+" tcp "+addr, masterOpts{})
			p.waitServing()
			waitHTTP(t, addr, 10*time.Second)
			baseline := fdCount(t, p.pid)
			l := startLoad(t, addr, 32, true)
			time.Sleep(500 * time.Millisecond)
			p.upgrade(60 * time.Second)
			time.Sleep(500 * time.Millisecond)
			l.requireNoFailures(t)
			s := masterStatus(t, p)
			offered := 0
			for _, r := range readReports(t, reports) {
				if r.Op == "offered" {
					offered++
				}
			}
			t.Logf("offered to the failing adopters %d times; master: %d handed over, %d returned", offered, s.ConnsHandedOver, s.ConnsReturned)
			if s.ConnsReturned == 0 || offered == 0 {
				t.Fatal("no connection was offered and given back")
			}
			if s.ConnsHandedOver != 0 {
				t.Fatalf("%d connections handed over to an adopter that never took one", s.ConnsHandedOver)
			}
			waitFDs(t, p.pid, baseline, "after the upgrade")
		})
	}
}

// TestHandoffHostile: a worker offers the master what is not a connection
// of its socket, or offers before it drains. Each socket offer fails with
// the right error, a descriptor that is not a socket stops the worker, and
// the master holds none of those descriptors afterwards.
func TestHandoffHostile(t *testing.T) {
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	// The hostile worker ignores the stop signal: the drain timeout ends it.
	p, reports := twMaster(t, 1, "gen1:hostile tcp "+addr+"; gen2:listen tcp "+addr, masterOpts{args: []string{"--drain-timeout", "3s"}})
	p.waitServing()
	waitReports(t, reports, 10*time.Second, "the pre-drain offer", func(rs []twReport) bool { return len(opsOf(rs, "offer", 1)) == 1 })
	baseline := fdCount(t, p.pid)
	from := len(p.entries())
	p.signal(syscall.SIGHUP)
	rs := waitReports(t, reports, 20*time.Second, "the hostile offers", func(rs []twReport) bool { return len(opsOf(rs, "hostile", 1)) == 1 })
	v, _ := p.waitLog(20*time.Second, from, "the violation", isEvent(events.WorkerViolation))
	t.Logf("violation: %s", v.str("reason"))
	want := map[string][]string{
		// Refused by the kernel (SO_PASSRIGHTS, Linux 6.16) or by the master.
		"predrain":  {"1", "EINVAL"},
		"pipe":      {""}, // no answer: the worker is stopped
		"listener":  {"EINVAL"},
		"otherport": {"EINVAL"},
		"datagram":  {"EPROTOTYPE"},
	}
	for _, r := range opsOf(rs, "offer", 1) {
		got := r.Errno
		if got == "" {
			got = r.Addr
		}
		ok := false
		for _, w := range want[r.Arg] {
			ok = ok || got == w
		}
		t.Logf("offer %s: %s %s", r.Arg, got, r.Err)
		if !ok {
			t.Errorf("offer %s: got %q (%s), want one of %v", r.Arg, got, r.Err, want[r.Arg])
		}
	}
	p.waitLog(60*time.Second, from, "the upgrade", isEvent(events.UpgradeFinished))
	waitFDs(t, p.pid, baseline, "after the hostile worker")
	if s := masterStatus(t, p); s.ConnsHandedOver != 0 {
		t.Fatalf("the master relayed %d of the hostile worker's descriptors", s.ConnsHandedOver)
	}
}
