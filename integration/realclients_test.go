package integration

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The tests of this file put clients and proxies that nobody here wrote in
// front of gorolling, through 10 HUPs and one master self-upgrade each.

// rollThrough sends 10 HUPs and then one USR2 to the master, spaced over
// the load, and returns once the new master serves.
func rollThrough(t *testing.T, p *proc, pidFile string) {
	t.Helper()
	for i := 0; i < 10; i++ {
		time.Sleep(300 * time.Millisecond)
		p.upgrade(60 * time.Second)
	}
	time.Sleep(300 * time.Millisecond)
	masterUpgrade(t, p, pidFile)
	time.Sleep(500 * time.Millisecond)
}

// stopMaster stops whichever master serves now (after a self-upgrade it
// is not the process the test started) and waits for it to exit.
func stopMaster(t *testing.T, p *proc) {
	t.Helper()
	if code, _, errOut := gorolling(t, nil, "stop", "--control", p.controlPath()); code != 0 {
		t.Fatalf("stop: exit %d: %s", code, errOut)
	}
}

// TestWrk drives keep-alive load with wrk straight at the workers: its own
// report shows no socket error and no non-2xx response.
func TestWrk(t *testing.T) {
	wrk := requireTool(t, "wrk")
	pidFile := filepath.Join(t.TempDir(), "master.pid")
	p := startMaster(t, masterOpts{args: []string{"-w", "2", "--pid-file", pidFile, "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	p.waitServing()
	addr := p.listenAddr(5 * time.Second)
	cmd := exec.Command(wrk, "-t", "2", "-c", "32", "-d", "8s", "--latency", "http://"+addr+"/")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		select {
		case <-done:
		default:
			cmd.Process.Kill()
			<-done
		}
	})
	time.Sleep(300 * time.Millisecond)
	rollThrough(t, p, pidFile)
	select {
	case err := <-done:
		done <- err
		if err != nil {
			t.Fatalf("wrk: %v\n%s", err, out.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("wrk did not finish:\n%s", out.String())
	}
	report := out.String()
	t.Logf("wrk through 10 HUPs and a USR2:\n%s", report)
	m := regexp.MustCompile(`(\d+) requests in`).FindStringSubmatch(report)
	if m == nil {
		t.Fatalf("no request count in wrk's report")
	}
	if n, _ := strconv.Atoi(m[1]); n < 1000 {
		t.Errorf("wrk made only %d requests", n)
	}
	if strings.Contains(report, "Socket errors") || strings.Contains(report, "Non-2xx") {
		t.Errorf("wrk saw errors")
	}
	stopMaster(t, p)
}

// TestHAProxy puts a real HAProxy in front, reusing its keep-alive
// connections to the workers for every client (http-reuse always) and
// never retrying, and sends POSTs through it: HAProxy's own log shows no
// 5xx and no connection error.
func TestHAProxy(t *testing.T) {
	haproxy := requireTool(t, "haproxy")
	pidFile := filepath.Join(t.TempDir(), "master.pid")
	p := startMaster(t, masterOpts{args: []string{"-w", "2", "--pid-file", pidFile, "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	p.waitServing()
	backend := p.listenAddr(5 * time.Second)
	front := "127.0.0.1:" + strconv.Itoa(freePort(t))
	dir := t.TempDir()
	logPath := filepath.Join(dir, "haproxy.log")
	cfg := fmt.Sprintf(`global
    log stdout format raw local0
    # one thread: HAProxy drops a line logged to a descriptor while
    # another thread writes one, and every line is counted here
    nbthread 1
    maxconn 1024
defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    retries 0
frontend fe
    bind %s
    default_backend be
backend be
    http-reuse always
    server app %s
`, front, backend)
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	hp := exec.Command(haproxy, "-db", "-f", cfgPath)
	hp.Stdout, hp.Stderr = logf, logf
	if err := hp.Start(); err != nil {
		t.Fatal(err)
	}
	hpDone := make(chan struct{})
	go func() { hp.Wait(); close(hpDone) }()
	t.Cleanup(func() {
		select {
		case <-hpDone:
		default:
			hp.Process.Signal(syscall.SIGTERM)
			select {
			case <-hpDone:
			case <-time.After(5 * time.Second):
				hp.Process.Kill()
				<-hpDone
			}
		}
	})
	waitHTTP(t, front, 10*time.Second)

	// 16 clients POST through HAProxy on keep-alive connections of their
	// own, and never retry.
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var mu sync.Mutex
	ok, failed := 0, 0
	var firstErr string
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1, DisableCompression: true}}
			defer c.CloseIdleConnections()
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := c.Post("http://"+front+"/", "application/json", strings.NewReader(`{"hello":"world"}`))
				var bad string
				if err != nil {
					bad = err.Error()
				} else {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						bad = resp.Status
					}
				}
				mu.Lock()
				if bad == "" {
					ok++
				} else {
					failed++
					if firstErr == "" {
						firstErr = bad
					}
				}
				mu.Unlock()
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	rollThrough(t, p, pidFile)
	close(stop)
	wg.Wait()
	t.Logf("through HAProxy: %d POSTs answered, %d failed", ok, failed)
	if failed > 0 || ok < 500 {
		t.Errorf("%d POSTs ok, %d failed (first: %s)", ok, failed, firstErr)
	}
	// HAProxy's log: one line per request, with the status after the
	// timers; none may be a 5xx or carry a termination state other than --.
	// A soft stop (USR1) lets HAProxy write its last log lines.
	hp.Process.Signal(syscall.SIGUSR1)
	select {
	case <-hpDone:
	case <-time.After(10 * time.Second):
		t.Fatal("HAProxy did not stop")
	}
	b, _ := os.ReadFile(logPath)
	line := regexp.MustCompile(` (\d{3}) \d+ - - (\S\S)`)
	n, bad := 0, 0
	for _, l := range strings.Split(string(b), "\n") {
		m := line.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		n++
		if m[1][0] == '5' || m[2] != "--" {
			bad++
			if bad <= 5 {
				t.Errorf("HAProxy logged: %s", l)
			}
		}
	}
	if n < ok {
		t.Errorf("HAProxy logged %d requests, the clients saw %d answered", n, ok)
	}

	t.Logf("HAProxy's log: %d requests, %d with a 5xx or an error", n, bad)
	stopMaster(t, p)
}
