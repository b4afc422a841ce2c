package integration

import (
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gorolling/gorolling/master/events"
)

// TestPythonWorker: a stdlib Python server on the pre-opened fd 3 with
// READY=1, under load through 2x4 upgrades: zero failed requests. Each
// worker sees LISTEN_PID equal to its own pid, its names, and exactly its
// stdio, the listener and the handoff channel as descriptors.
func TestPythonWorker(t *testing.T) {
	py := requireTool(t, "python3")
	report := filepath.Join(t.TempDir(), "py.jsonl")
	p := startMaster(t, masterOpts{
		args: []string{"-w", "3", "--listen", "tcp://127.0.0.1:0?name=web", "--", py, examplePath(t, "python/server.py")},
		env:  []string{"PY_REPORT=" + report, "DRAIN_GRACE=1"},
	})
	p.waitServing()
	e, _ := p.waitLog(5*time.Second, 0, "the pre-opened listener", isEvent(events.ListenerPreopened))
	addr := e.str("addr")
	for _, e := range p.entries() {
		if e.event() == events.WorkerReady && e.str("via") != "notify" {
			t.Errorf("worker %d ready via %q, want notify (READY=1)", e.num("pid"), e.str("via"))
		}
	}
	loadWithUpgrades(t, p, addr, 4)

	rs := readPyReports(t, report)
	if len(rs) < 3*9 {
		t.Fatalf("%d worker start reports, want at least 27", len(rs))
	}
	for _, r := range rs {
		if r.Env["LISTEN_PID"] != strconv.Itoa(r.PID) {
			t.Errorf("worker %d: LISTEN_PID=%q", r.PID, r.Env["LISTEN_PID"])
		}
		if r.Env["LISTEN_FDS"] != "1" || r.Env["LISTEN_FDNAMES"] != "web" || r.Env["GOROLLING_FD"] != "4" || r.Env["NOTIFY_SOCKET"] == "" {
			t.Errorf("worker %d environment: %v", r.PID, r.Env)
		}
		if !slices.Equal(r.FDs, []int{0, 1, 2, 3, 4}) || !slices.Equal(r.Activated, []int{3}) {
			t.Errorf("worker %d started with fds %v (activated %v), want [0 1 2 3 4] ([3])", r.PID, r.FDs, r.Activated)
		}
	}
	if b := blockingSockets(t, p.pid); len(b) > 0 {
		t.Errorf("master sockets in blocking mode after Python workers: %v", b)
	}
}

// TestNodeWorker: a Node.js server with server.listen({fd: 3}), ready
// through systemd-notify, under load through 2x4 upgrades: zero failures.
func TestNodeWorker(t *testing.T) {
	node := requireTool(t, "node")
	requireTool(t, "systemd-notify")
	p := startMaster(t, masterOpts{
		args: []string{"-w", "3", "--listen", "tcp://127.0.0.1:0", "--", node, examplePath(t, "node/server.js")},
		env:  []string{"DRAIN_GRACE_MS=1000"},
	})
	p.waitServing()
	e, _ := p.waitLog(5*time.Second, 0, "the pre-opened listener", isEvent(events.ListenerPreopened))
	addr := e.str("addr")
	loadWithUpgrades(t, p, addr, 4)
	if pid, gen := get(t, addr); gen != 9 || !slices.Contains(p.workerPIDs(9), pid) {
		t.Fatalf("served by pid %d of generation %d, want generation 9", pid, gen)
	}
}

// TestSocketActivatedMaster: the master started by systemd-socket-activate
// adopts the socket it is given by name, serves it to Python workers
// (--listen fd://NAME) and to Go workers (ListenFD on the master's fd 3).
func TestSocketActivatedMaster(t *testing.T) {
	sa := requireTool(t, "systemd-socket-activate")
	py := requireTool(t, "python3")
	port := freePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(port)
	report := filepath.Join(t.TempDir(), "py.jsonl")
	p := startMaster(t, masterOpts{
		// systemd-socket-activate passes on only the variables it is told to.
		wrap: []string{sa, "-l", addr, "--fdname=web", "-E", "PY_REPORT=" + report},
		args: []string{"-w", "2", "--listen", "fd://web", "--", py, examplePath(t, "python/server.py")},
	})
	// systemd-socket-activate execs the master on the first connection.
	go poke(addr)
	p.waitServing()
	e, _ := p.waitLog(5*time.Second, 0, "the adopted socket", isEvent(events.InheritedAdopted))
	if e.num("fd") != 3 || e.str("name") != "web" || e.str("addr") != addr {
		t.Fatalf("adopted %v", e)
	}
	if pid, _ := get(t, addr); !slices.Contains(p.workerPIDs(1), pid) {
		t.Fatalf("served by %d, not a worker", pid)
	}
	rs := readPyReports(t, report)
	if len(rs) != 2 {
		t.Fatalf("%d worker reports, want 2", len(rs))
	}
	for _, r := range rs {
		if r.Env["LISTEN_FDNAMES"] != "web" || r.Env["LISTEN_PID"] != strconv.Itoa(r.PID) {
			t.Errorf("worker %d environment %v", r.PID, r.Env)
		}
	}
	if b := blockingSockets(t, p.pid); len(b) > 0 {
		t.Errorf("adopted socket left in blocking mode: fds %v", b)
	}
	p.upgrade(30 * time.Second)
	if _, gen := get(t, addr); gen != 2 {
		t.Fatalf("generation %d serves after the upgrade", gen)
	}

	// Go workers reach the same socket with ListenFD(3).
	report2 := filepath.Join(t.TempDir(), "tw.jsonl")
	port2 := freePort(t)
	addr2 := "127.0.0.1:" + strconv.Itoa(port2)
	p2 := startMaster(t, masterOpts{
		wrap: []string{sa, "-l", addr2, "-E", "TW_SCRIPT=listenfd 3", "-E", "TW_REPORT=" + report2},
		args: []string{"-w", "2", "--", binPath("testworker")},
	})
	go poke(addr2)
	p2.waitServing()
	fdrs := opsOf(readReports(t, report2), "listenfd", 1)
	if len(fdrs) != 2 {
		t.Fatalf("%d ListenFD reports, want 2", len(fdrs))
	}
	for _, r := range fdrs {
		if r.Err != "" || r.Addr != addr2 {
			t.Fatalf("ListenFD(3) under a socket-activated master: %+v", r)
		}
	}
	get(t, addr2)
}

// TestGoWorkerUnderSocketActivation: the example server started by
// systemd-socket-activate directly (no gorolling) serves the inherited
// socket through worker.Listen: it would fail with EADDRINUSE if it bound.
func TestGoWorkerUnderSocketActivation(t *testing.T) {
	sa := requireTool(t, "systemd-socket-activate")
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	cmd := startProcess(t, sa, "-l", addr, binPath("example-server"), "-listen", addr)
	waitHTTP(t, addr, 10*time.Second)
	pid, gen := get(t, addr)
	if pid != cmd.Process.Pid || gen != 0 {
		t.Fatalf("served by pid %d generation %d; want the activated process %d, standalone", pid, gen, cmd.Process.Pid)
	}
}

// TestPreopenedSharedWithGoListen: a Go worker's Listen on the address of a
// --listen socket shares it instead of failing with EADDRINUSE.
func TestPreopenedSharedWithGoListen(t *testing.T) {
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	p, report := twMaster(t, 2, "listen tcp "+addr, masterOpts{args: []string{"--listen", "tcp://" + addr}})
	rs := waitReports(t, report, 10*time.Second, "two listens", func(rs []twReport) bool { return len(opsOf(rs, "listen", 1)) == 2 })
	for _, r := range opsOf(rs, "listen", 1) {
		if r.Err != "" || r.Addr != addr {
			t.Fatalf("listen on the pre-opened address: %+v", r)
		}
	}
	for _, r := range opsOf(rs, "fds", 1) {
		if !slices.Equal(r.FDs, []int{0, 1, 2, 3, 4}) || r.Env != "4" {
			t.Errorf("worker %d fds %v GOROLLING_FD=%s", r.PID, r.FDs, r.Env)
		}
	}
	get(t, addr)
	if n := p.count(isEvent(events.ListenerHandedOver)); n != 2 {
		t.Errorf("%d listeners handed over, want 2", n)
	}
}

// TestListenFlagErrors: bad --listen specs and a port in use are refused at
// start, naming the spec and the reason.
func TestListenFlagErrors(t *testing.T) {
	busy := freePort(t)
	l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(busy))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for _, tc := range []struct{ spec, want string }{
		{"tcp://127.0.0.1:" + strconv.Itoa(busy), "address already in use"},
		{"http://x:1", `unknown scheme "http"`},
		{"tcp://nohostport", "want HOST:PORT"},
		{"unix:///tmp/x.sock?mode=999", "not an octal file mode"},
		{"tcp://:1?name=a:b", "without spaces or ':'"},
		{"fd://9", "no inherited socket on fd 9"},
		{"fd://nosuch", `no inherited socket is named "nosuch"`},
	} {
		t.Run(tc.spec, func(t *testing.T) {
			p := startMaster(t, masterOpts{args: []string{"--listen", tc.spec, "--", binPath("testworker")}})
			if code := p.wait(10 * time.Second); code == 0 {
				t.Fatal("master started")
			}
			p.mu.Lock()
			last := p.lines[len(p.lines)-1]
			p.mu.Unlock()
			if !strings.Contains(last, tc.spec) || !strings.Contains(last, tc.want) {
				t.Fatalf("last line %q, want the spec and %q", last, tc.want)
			}
		})
	}
}

// TestNotifyAttribution: a worker cannot mark another worker ready by
// writing to its notify socket; STATUS= is logged.
func TestNotifyAttribution(t *testing.T) {
	p, _ := twMaster(t, 2, `noready; slot1: notifysibling READY=1; slot1: sleep 100ms; slot1: notify READY=1\nSTATUS=warm`,
		masterOpts{args: []string{"--ready-timeout", "1500ms"}})
	p.waitLog(5*time.Second, 0, "the rejected notification", isEvent(events.WorkerNotifyIgnored))
	for _, e := range p.entries() {
		if e.event() == events.WorkerReady && e.num("slot") == 0 {
			t.Fatalf("slot 0 became ready from its sibling's message")
		}
	}
	e, _ := p.waitLog(5*time.Second, 0, "slot 1 ready", func(e entry) bool { return e.event() == events.WorkerReady && e.num("slot") == 1 })
	if e.str("via") != "notify" {
		t.Fatalf("slot 1 ready via %q", e.str("via"))
	}
	p.waitLog(5*time.Second, 0, "the status", func(e entry) bool { return e.event() == events.WorkerStatus && e.str("status") == "warm" })
}

// TestReadyTimer: --ready=timer:D serves programs that signal nothing.
func TestReadyTimer(t *testing.T) {
	p, _ := twMaster(t, 2, "noready; listen tcp 127.0.0.1:0", masterOpts{args: []string{"--ready=timer:300ms"}})
	for _, e := range p.entries() {
		if e.event() == events.WorkerReady && e.str("via") != "timer" {
			t.Fatalf("ready via %q", e.str("via"))
		}
	}
	p.upgrade(10 * time.Second)
}
