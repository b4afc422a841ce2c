package integration

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"
)

// failure is one failed request.
type failure struct {
	err string
	// lastPid is the worker that served the previous request on the same
	// connection (0 for a connection's first request).
	lastPid int
}

// loader runs a load loop of HTTP/1.1 POSTs from clients that never retry:
// every dial error, write error, read error or non-200 answer counts as a
// failed request.
type loader struct {
	addr      string
	keepAlive bool
	path      string
	stop      chan struct{}
	wg        sync.WaitGroup

	mu       sync.Mutex
	ok       int
	failures []failure
	byGen    map[int]int
	byPid    map[int]int
}

// startLoad starts n clients against addr. With keepAlive each client
// reuses its connection until the server says "Connection: close";
// without, every request opens a new connection.
func startLoad(t *testing.T, addr string, n int, keepAlive bool) *loader {
	l := &loader{addr: addr, keepAlive: keepAlive, path: "/", stop: make(chan struct{}), byGen: map[int]int{}, byPid: map[int]int{}}
	for i := 0; i < n; i++ {
		l.wg.Add(1)
		go l.client()
	}
	t.Cleanup(l.halt)
	return l
}

func (l *loader) halt() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

func (l *loader) stopped() bool {
	select {
	case <-l.stop:
		return true
	default:
		return false
	}
}

func (l *loader) client() {
	defer l.wg.Done()
	var conn net.Conn
	var br *bufio.Reader
	lastPid := 0
	body := "hello"
	req := "POST " + l.path + " HTTP/1.1\r\nHost: gorolling-test\r\nContent-Type: text/plain\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n"
	if !l.keepAlive {
		req += "Connection: close\r\n"
	}
	req += "\r\n" + body
	drop := func() {
		if conn != nil {
			conn.Close()
		}
		conn, br, lastPid = nil, nil, 0
	}
	defer drop()
	for !l.stopped() {
		if conn == nil {
			c, err := net.DialTimeout("tcp", l.addr, 5*time.Second)
			if err != nil {
				l.fail(failure{err: "dial: " + err.Error()})
				time.Sleep(5 * time.Millisecond)
				continue
			}
			conn, br = c, bufio.NewReader(c)
		}
		conn.SetDeadline(time.Now().Add(15 * time.Second))
		if _, err := io.WriteString(conn, req); err != nil {
			l.fail(failure{err: "write: " + err.Error(), lastPid: lastPid})
			drop()
			continue
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			l.fail(failure{err: "read: " + err.Error(), lastPid: lastPid})
			drop()
			continue
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			l.fail(failure{err: fmt.Sprintf("status %d, body error %v", resp.StatusCode, err), lastPid: lastPid})
			drop()
			continue
		}
		pid, _ := strconv.Atoi(resp.Header.Get("X-Pid"))
		gen, _ := strconv.Atoi(resp.Header.Get("X-Generation"))
		l.mu.Lock()
		l.ok++
		l.byGen[gen]++
		l.byPid[pid]++
		l.mu.Unlock()
		lastPid = pid
		if !l.keepAlive || resp.Close {
			drop()
		}
	}
}

func (l *loader) fail(f failure) {
	l.mu.Lock()
	l.failures = append(l.failures, f)
	l.mu.Unlock()
}

func (l *loader) counts() (ok int, failed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ok, len(l.failures)
}

// report stops the load and fails the test if any request failed.
func (l *loader) requireNoFailures(t *testing.T) {
	t.Helper()
	l.halt()
	l.mu.Lock()
	defer l.mu.Unlock()
	t.Logf("load: %d requests ok, %d failed; by generation %v", l.ok, len(l.failures), l.byGen)
	if l.ok == 0 {
		t.Fatal("no request succeeded")
	}
	if len(l.failures) > 0 {
		for i, f := range l.failures {
			if i == 10 {
				break
			}
			t.Errorf("failed request (previous pid on the connection %d): %s", f.lastPid, f.err)
		}
		t.Fatalf("%d of %d requests failed", len(l.failures), l.ok+len(l.failures))
	}
}

// get does one request on a new connection and returns the serving pid and
// generation.
func get(t *testing.T, addr string) (pid, gen int) {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/")
	if err != nil {
		t.Fatalf("GET %s: %v", addr, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	pid, _ = strconv.Atoi(resp.Header.Get("X-Pid"))
	gen, _ = strconv.Atoi(resp.Header.Get("X-Generation"))
	return pid, gen
}
