package integration

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
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
	// wrk runs until it is interrupted after the last upgrade (it prints
	// its report on SIGINT); -d only bounds a run whose test died. Its
	// default timeout (2 s) is the request bound: a slower answer shows up
	// as a socket error.
	cmd := exec.Command(wrk, "-t", "2", "-c", "32", "-d", "300s", "--latency", "http://"+addr+"/")
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
		t.Fatalf("wrk ended before the last upgrade did: %v\n%s", err, out.String())
	default:
	}
	cmd.Process.Signal(syscall.SIGINT)
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
			// The timeout is the bound on one request (slowRequest): a
			// slower answer counts as a failure.
			c := &http.Client{Timeout: slowRequest, Transport: &http.Transport{MaxIdleConnsPerHost: 1, DisableCompression: true}}
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

// TestNginxKeepalivePool puts a real nginx in front with an upstream
// keep-alive pool (HTTP/1.1, keepalive 32, no retries) and sends POSTs
// with idle gaps through 20 HUPs. The hand-off keeps every pooled
// connection open: nginx answers no 5xx, logs no upstream error, and opens
// no upstream connection after the first generation (every request
// arrives from a client port the first generation saw).
func TestNginxKeepalivePool(t *testing.T) {
	nginx := requireTool(t, "nginx")
	p, backend := exampleMaster(t, 2)
	front := "127.0.0.1:" + strconv.Itoa(freePort(t))
	dir := t.TempDir()
	cfg := fmt.Sprintf(`daemon off;
master_process off;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 1024; }
http {
    client_body_temp_path %[1]s/body;
    proxy_temp_path %[1]s/proxy;
    log_format st '$status $upstream_status $upstream_addr';
    access_log %[1]s/access.log st;
    upstream app {
        server %[2]s max_fails=0;
        keepalive 32;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    server {
        listen %[3]s;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream off;
        }
    }
}
`, dir, backend, front)
	conf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	startProcess(t, nginx, "-p", dir, "-c", conf)
	waitHTTP(t, front, 10*time.Second)

	const clients = 16
	// The timeout is the bound on one request (slowRequest): a slower
	// answer counts as a failure.
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients, DisableCompression: true}, Timeout: slowRequest}
	var mu sync.Mutex
	peers := map[string]int{} // upstream client address -> first generation it was seen in
	var failures []string
	ok, late := 0, 0
	post := func(path string) {
		resp, err := client.Post("http://"+front+path, "text/plain", strings.NewReader("hello"))
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			failures = append(failures, err.Error())
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			failures = append(failures, resp.Status)
			return
		}
		ok++
		gen, _ := strconv.Atoi(resp.Header.Get("X-Generation"))
		peer := resp.Header.Get("X-Peer")
		if _, seen := peers[peer]; !seen {
			peers[peer] = gen
			if gen > 1 {
				late++
			}
		}
	}
	// Warm the pool: as many requests in flight at once as there will
	// ever be, so nginx opens every upstream connection it needs now.
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); post("/?sleep=300ms") }()
	}
	wg.Wait()
	stop := make(chan struct{})
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				case <-time.After(time.Duration(50+rand.IntN(450)) * time.Millisecond):
				}
				post("/")
			}
		}()
	}
	for i := 0; i < 20; i++ {
		time.Sleep(300 * time.Millisecond)
		p.upgrade(60 * time.Second)
	}
	time.Sleep(600 * time.Millisecond)
	close(stop)
	wg.Wait()

	access, _ := os.ReadFile(filepath.Join(dir, "access.log"))
	errLog, _ := os.ReadFile(filepath.Join(dir, "error.log"))
	fivexx := 0
	for _, line := range strings.Split(strings.TrimSpace(string(access)), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], "5") {
			fivexx++
		}
	}
	mu.Lock()
	defer mu.Unlock()
	t.Logf("%d POSTs through nginx, %d failed, %d 5xx in its log; %d upstream connections, %d opened after generation 1; master: %d handed over", ok, len(failures), fivexx, len(peers), late, masterStatus(t, p).ConnsHandedOver)
	for i, f := range failures {
		if i < 10 {
			t.Errorf("failed: %s", f)
		}
	}
	if len(failures) > 0 || fivexx > 0 {
		t.Fatalf("%d requests failed, %d 5xx", len(failures), fivexx)
	}
	if strings.Contains(string(errLog), "upstream") || strings.Contains(string(errLog), "[error]") {
		t.Fatalf("nginx logged errors:\n%s", errLog)
	}
	if late > 0 {
		t.Fatalf("nginx opened %d upstream connections after the first generation; the pool should have moved with the hand-off", late)
	}
}
