package integration

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorolling/gorolling/master/events"
	"github.com/gorolling/gorolling/master/procfs"
)

// The tests of this file cover what happens when the master itself dies:
// under a service manager that keeps its sockets (fakesystemd, which
// implements systemd's fd store, restart and watchdog), as a container's
// pid 1, and across master upgrades.

// supervised starts "gorolling exec ARGS" under fakesystemd with an fd
// store and the given extra fakesystemd flags.
func supervised(t *testing.T, sdFlags []string, o masterOpts) *proc {
	t.Helper()
	o.wrap = append(append([]string{binPath("fakesystemd"), "--store-max", "4096"}, sdFlags...), "--")
	p := startMaster(t, o)
	p.waitLog(30*time.Second, 0, "the service manager to see the master ready", isEvent("sd.ready"))
	return p
}

// mainPID is the service's current main process: the last fakesystemd
// started or was told of.
func (p *proc) mainPID() int {
	pid := 0
	for _, e := range p.entries() {
		switch e.event() {
		case "sd.start":
			pid = e.num("pid")
		case "sd.mainpid":
			pid = e.num("main")
		}
	}
	return pid
}

// TestMasterCrashRefusesNothing kills the master with SIGKILL five times at
// random moments under load from 32 clients that open a new connection
// for every request and never retry. The service manager keeps the
// sockets (the fd store) and starts a new master, which takes them back
// under the same keys: no request is refused, reset or lost, the port-0
// port stays, the worker count set at run time and the numbering carry
// on, and at the end nothing is left running.
func TestMasterCrashRefusesNothing(t *testing.T) {
	p := supervised(t, []string{"--restart-sec", "100ms"}, masterOpts{args: []string{"-w", "2", "--", binPath("example-server"), "--listen", "127.0.0.1:0"}})
	addr := p.listenAddr(10 * time.Second)
	ctl := p.controlPath()
	if code, _, errOut := gorolling(t, nil, "scale", "3", "--control", ctl); code != 0 {
		t.Fatalf("scale 3: exit %d: %s", code, errOut)
	}
	p.waitLog(30*time.Second, 0, "the third worker", func(e entry) bool {
		return e.event() == events.WorkerReady && e.num("slot") == 2
	})

	l := startLoad(t, addr, 32, false)
	var downtime []time.Duration
	for i := 0; i < 5; i++ {
		time.Sleep(time.Duration(200+rand.IntN(500)) * time.Millisecond)
		victim := p.mainPID()
		from := len(p.entries())
		killed := time.Now()
		if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
			t.Fatalf("kill -9 %d: %v", victim, err)
		}
		e, _ := p.waitLog(30*time.Second, from, "a new master to be ready", func(e entry) bool {
			return e.event() == "sd.ready" && e.num("pid") != victim
		})
		downtime = append(downtime, time.Since(killed))
		t.Logf("crash %d: master %d killed; master %d ready %s later", i+1, victim, e.num("pid"), time.Since(killed).Round(time.Millisecond))
	}
	time.Sleep(300 * time.Millisecond)
	l.requireNoFailures(t)
	sort.Slice(downtime, func(i, j int) bool { return downtime[i] < downtime[j] })
	t.Logf("master crash cost: kill -9 to a new master ready: median %s, max %s; slowest request %s (new connection per request, none refused)",
		downtime[len(downtime)/2].Round(time.Millisecond), downtime[len(downtime)-1].Round(time.Millisecond), l.slowest.Round(time.Millisecond))

	// What the new master took back and carried on.
	st := statusOf(t, ctl)
	if got := int(st["master_restarts"].(float64)); got != 5 {
		t.Errorf("status says %d master restarts, want 5", got)
	}
	if got := int(st["workers"].(float64)); got != 3 {
		t.Errorf("the restarted master runs %d workers, want the 3 that scale set (not -w 2)", got)
	}
	if got := int(st["generation"].(float64)); got != 6 {
		t.Errorf("serving generation %d, want 6: numbering continues across restarts", got)
	}
	if got := p.listenAddr(time.Second); got != addr {
		t.Errorf("the port-0 listener moved from %s to %s", addr, got)
	}
	for _, e := range p.entries() {
		// One listen, three slots: each slot has its own socket of the
		// reuseport group (--spread even).
		if e.event() == events.MasterRestarted && e.num("sockets") != 3 {
			t.Errorf("a restarted master took %d sockets back, want 3", e.num("sockets"))
		}
		if e.event() == "sd.rejected" {
			t.Errorf("the service manager refused a message from pid %d (not the main process): %s", e.num("pid"), e.str("text"))
		}
	}

	// Stop everything; no process may be left.
	p.signal(syscall.SIGTERM)
	if code := p.wait(60 * time.Second); code != 0 {
		t.Fatalf("the service stopped with status %d, want 0", code)
	}
	for _, pid := range append(p.allWorkerPIDs(), masterPIDsLogged(p)...) {
		if alive(pid) {
			t.Errorf("process %d outlived the service", pid)
		}
	}
}

// masterPIDsLogged returns every master pid the log names.
func masterPIDsLogged(p *proc) []int {
	var out []int
	for _, e := range p.entries() {
		if e.event() == "sd.start" {
			out = append(out, e.num("pid"))
		}
	}
	return out
}

// TestWatchdogStuckMasterIsRestarted: with WatchdogSec=, the master beats
// from the loop that checks its own state; a master stuck on its lock (a
// test hook) stops beating, the service manager aborts it and starts a new
// one with the stored sockets, and clients see nothing of it.
func TestWatchdogStuckMasterIsRestarted(t *testing.T) {
	stall := filepath.Join(t.TempDir(), "stall")
	p := supervised(t, []string{"--watchdog", "1s"}, masterOpts{
		bin:  binPath("gorolling-debug"),
		env:  []string{"GOROLLING_DEBUG_STALL_FILE=" + stall},
		args: []string{"-w", "2", "--", binPath("example-server"), "--listen", "127.0.0.1:0"},
	})
	addr := p.listenAddr(10 * time.Second)
	first := p.mainPID()
	beats := func(pid int) int {
		return p.count(func(e entry) bool { return e.event() == "sd.beat" && e.num("pid") == pid })
	}
	for end := time.Now().Add(10 * time.Second); beats(first) < 3; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("%d watchdog beats from the master in 10 s, want 3 or more (every 500 ms)", beats(first))
		}
	}
	l := startLoad(t, addr, 8, false)
	time.Sleep(200 * time.Millisecond)
	if err := os.WriteFile(stall, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, stalledAt := p.waitLog(10*time.Second, 0, "the master to stall", func(e entry) bool { return strings.Contains(e.str("@message"), "stalling the master") })
	e, abortAt := p.waitLog(10*time.Second, stalledAt, "the watchdog to fire", isEvent("sd.watchdog"))
	if e.num("pid") != first {
		t.Fatalf("the watchdog fired for pid %d, want the stalled master %d", e.num("pid"), first)
	}
	late := 0
	for _, e := range p.entries()[stalledAt:abortAt] {
		if e.event() == "sd.beat" && e.num("pid") == first {
			late++
		}
	}
	if late > 1 { // one may have been under way as it stalled
		t.Errorf("the stalled master sent %d watchdog beats", late)
	}
	second, err := waitNewMain(p, first)
	if err != nil {
		t.Fatal(err)
	}
	for end := time.Now().Add(10 * time.Second); beats(second) < 2; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the new master does not beat the watchdog")
		}
	}
	time.Sleep(300 * time.Millisecond)
	l.requireNoFailures(t)
	p.signal(syscall.SIGTERM)
	if code := p.wait(60 * time.Second); code != 0 {
		t.Fatalf("the service stopped with status %d, want 0", code)
	}
}

// waitNewMain waits until a main process other than old is ready.
func waitNewMain(p *proc, old int) (int, error) {
	e, _ := p.waitLog(30*time.Second, 0, "a new master to be ready", func(e entry) bool {
		return e.event() == "sd.ready" && e.num("pid") != old
	})
	return e.num("pid"), nil
}

// TestScaleSurvivesMasterUpgrade: the worker count set at run time (scale,
// TTIN) is the successor's, not its -w.
func TestScaleSurvivesMasterUpgrade(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "master.pid")
	p := startMaster(t, masterOpts{args: []string{"-w", "2", "--pid-file", pidFile, "--", binPath("example-server"), "--listen", "127.0.0.1:0"}})
	p.waitServing()
	ctl := p.controlPath()
	workersOf := func() (int, int) {
		st := statusOf(t, ctl)
		gen := int(st["generation"].(float64))
		n := 0
		for _, w := range st["processes"].([]any) {
			if w := w.(map[string]any); int(w["generation"].(float64)) == gen && w["state"] == "ready" {
				n++
			}
		}
		return int(st["workers"].(float64)), n
	}
	waitWorkers := func(want int) {
		t.Helper()
		for end := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			size, ready := workersOf()
			if size == want && ready == want {
				return
			}
			if time.Now().After(end) {
				t.Fatalf("%d workers (%d ready), want %d", size, ready, want)
			}
		}
	}
	if code, _, errOut := gorolling(t, nil, "scale", "3", "--control", ctl); code != 0 {
		t.Fatalf("scale: exit %d: %s", code, errOut)
	}
	waitWorkers(3)
	masterUpgrade(t, p, pidFile)
	waitWorkers(3)
	// TTIN on the new master, then another upgrade.
	if err := syscall.Kill(readPID(t, pidFile), syscall.SIGTTIN); err != nil {
		t.Fatal(err)
	}
	waitWorkers(4)
	masterUpgrade(t, p, pidFile)
	waitWorkers(4)
}

// TestPID1 runs the master as pid 1 of a new pid namespace, as in a
// container: it reaps the orphans its workers leave, HUP rolls the workers
// under load with no failed request, USR2 is refused with a message that
// says why and what to do, and TERM (docker stop) drains and exits 0.
func TestPID1(t *testing.T) {
	requireRoot(t)
	unshare := requireTool(t, "unshare")
	dir := t.TempDir()
	report := filepath.Join(dir, "report.jsonl")
	p := startMaster(t, masterOpts{
		wrap:  []string{unshare, "--pid", "--fork", "--mount-proc"},
		pidNS: true,
		env:   []string{"TW_SCRIPT=listen tcp 127.0.0.1:0;orphans 20", "TW_REPORT=" + report},
		args:  []string{"-w", "2", "--", binPath("testworker")},
	})
	p.waitServing()
	e, _ := p.waitLog(10*time.Second, 0, "the master's start", isEvent(events.MasterStarting))
	if e.num("pid") != 1 {
		t.Fatalf("the master is pid %d in its namespace, want 1", e.num("pid"))
	}
	// The master as this namespace sees it: unshare's child.
	var master int
	for end := time.Now().Add(5 * time.Second); master == 0; time.Sleep(20 * time.Millisecond) {
		if kids := children(p.pid); len(kids) == 1 {
			master = kids[0]
		} else if time.Now().After(end) {
			t.Fatalf("unshare %d has children %v, want the master alone", p.pid, kids)
		}
	}
	addr := p.listenAddr(10 * time.Second)

	// Orphans: the 40 sleeps end after 200 ms; none may stay a zombie.
	zombies := func() []int {
		var out []int
		for _, c := range children(master) {
			if st, err := procfs.ReadStat(c); err == nil && st.State == 'Z' {
				out = append(out, c)
			}
		}
		return out
	}
	time.Sleep(time.Second)
	for end := time.Now().Add(5 * time.Second); len(zombies()) > 0; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("zombies left under pid 1: %v", zombies())
		}
	}
	if n := p.count(isEvent(events.OrphanReaped)); n < 40 {
		t.Errorf("%d orphans reaped, want the 40 the workers left", n)
	}

	// HUP under load, keep-alive and new connections.
	hup := func() {
		from := len(p.entries())
		syscall.Kill(master, syscall.SIGHUP)
		e, _ := p.waitLog(60*time.Second, from, "an upgrade", func(e entry) bool {
			return e.event() == events.UpgradeFinished || e.event() == events.UpgradeRolledBack
		})
		if e.event() != events.UpgradeFinished {
			t.Fatalf("upgrade rolled back: %s", e.str("reason"))
		}
	}
	for _, keepAlive := range []bool{true, false} {
		l := startLoad(t, addr, 16, keepAlive)
		time.Sleep(200 * time.Millisecond)
		for i := 0; i < 3; i++ {
			hup()
			time.Sleep(200 * time.Millisecond)
		}
		l.requireNoFailures(t)
	}

	// USR2: refused, with the reason, and the same master serves on.
	from := len(p.entries())
	syscall.Kill(master, syscall.SIGUSR2)
	e, _ = p.waitLog(30*time.Second, from, "the master upgrade's outcome", func(e entry) bool {
		return e.event() == events.MasterUpgradeFailed || e.event() == events.MasterUpgradeServing
	})
	if e.event() != events.MasterUpgradeFailed || !strings.Contains(e.str("reason"), "pid 1") || !strings.Contains(e.str("reason"), "restart the container") {
		t.Fatalf("USR2 as pid 1: %s %q, want a refusal that names pid 1 and the way out", e.event(), e.str("reason"))
	}
	code, _, errOut := gorolling(t, nil, "upgrade", "--master", "--wait", "--control", p.controlPath())
	if code == 0 || !strings.Contains(errOut, "pid 1") {
		t.Errorf("gorolling upgrade --master as pid 1: exit %d, %q; want a failure that says why", code, errOut)
	}
	if !alive(master) || len(children(p.pid)) != 1 {
		t.Fatal("the master did not survive the refused upgrade")
	}
	if pid, _ := get(t, addr); pid == 0 {
		t.Fatal("no answer after the refused upgrade")
	}

	// docker stop: TERM, a drain that finishes what is in flight, exit 0.
	slow := make(chan error, 1)
	go func() { slow <- slowGet(addr, 600*time.Millisecond) }()
	time.Sleep(150 * time.Millisecond)
	// The log names workers by their pids in the namespace; outside it,
	// they are the master's children.
	var workers []int
	for _, c := range children(master) {
		if alive(c) {
			workers = append(workers, c)
		}
	}
	if len(workers) != 2 {
		t.Fatalf("the master has %d live children %v, want its 2 workers", len(workers), workers)
	}
	syscall.Kill(master, syscall.SIGTERM)
	if err := <-slow; err != nil {
		t.Errorf("the request in flight at TERM: %v", err)
	}
	if code := p.wait(30 * time.Second); code != 0 {
		t.Fatalf("exit status %d after TERM, want 0", code)
	}
	for _, pid := range workers {
		if alive(pid) {
			t.Errorf("worker %d outlived pid 1", pid)
		}
	}
	if !slices.ContainsFunc(p.entries(), isEvent(events.MasterStopped)) {
		t.Error("no graceful stop logged")
	}
}

// slowGet sends one request that the server answers after d, and checks
// it is answered in full.
func slowGet(addr string, d time.Duration) error {
	return getPath(addr, "/?sleep="+strconv.Itoa(int(d.Milliseconds()))+"ms")
}

// getPath does one GET of path on a new connection and checks for a 200
// with a body.
func getPath(addr, path string) error {
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK || len(b) == 0 {
		return fmt.Errorf("status %d, %d bytes", resp.StatusCode, len(b))
	}
	return nil
}

// TestFDStoreFollowsMasterUpgrade: a successor master keeps the fd store
// after a self-upgrade. A socket its generation no longer asks for leaves
// the store once the old master is gone (systemd would otherwise keep its
// port bound, taking connections nobody accepts, for the unit's life),
// and a requested stop empties the store, so that "systemctl restart",
// across which systemd keeps it, starts afresh.
func TestFDStoreFollowsMasterUpgrade(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "master.pid")
	report := filepath.Join(t.TempDir(), "report")
	p := supervised(t, nil, masterOpts{
		args: []string{"-w", "1", "--pid-file", pidFile, "--", binPath("testworker")},
		env:  []string{"TW_SCRIPT=listen tcp 127.0.0.1:0; gen1:listen tcp 127.0.0.1:0", "TW_REPORT=" + report},
	})
	p.waitServing()
	addrsOf := func(gen int) map[string]bool {
		out := map[string]bool{}
		for _, e := range p.entries() {
			if e.event() == events.ListenerHandedOver && e.num("generation") == gen {
				out[e.str("addr")] = true
			}
		}
		return out
	}
	first := addrsOf(1)
	if len(first) != 2 {
		t.Fatalf("generation 1 listens on %v, want 2 addresses", first)
	}
	// The store's size as the service manager counts it, after the last
	// change it saw.
	held := func() int {
		n := -1
		for _, e := range p.entries() {
			if e.event() == "sd.store" || e.event() == "sd.remove" {
				n = e.num("held")
			}
		}
		return n
	}
	waitHeld := func(want int, what string) {
		t.Helper()
		for end := time.Now().Add(10 * time.Second); held() != want; time.Sleep(50 * time.Millisecond) {
			if time.Now().After(end) {
				t.Fatalf("%s, the fd store holds %d entries, want %d", what, held(), want)
			}
		}
	}
	waitHeld(3, "with 2 sockets and the state document")

	masterUpgrade(t, p, pidFile)
	second := addrsOf(2)
	var dropped string
	for a := range first {
		if !second[a] {
			dropped = a
		}
	}
	if len(second) != 1 || dropped == "" {
		t.Fatalf("generation 2 listens on %v; generation 1 on %v", second, first)
	}
	waitHeld(2, "after the old master left (the socket still used and the state document)")
	// Nobody holds the dropped socket now: its port refuses.
	if c, err := net.DialTimeout("tcp", dropped, time.Second); err == nil {
		c.Close()
		t.Errorf("%s, which no worker asks for any more, still accepts connections", dropped)
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial %s: %v, want connection refused", dropped, err)
	}

	p.signal(syscall.SIGTERM)
	if code := p.wait(60 * time.Second); code != 0 {
		t.Fatalf("the service stopped with status %d, want 0", code)
	}
	n := -1
	for _, e := range p.entries() {
		if e.event() == "sd.inactive" {
			n = e.num("held")
		}
	}
	switch {
	case n < 0:
		t.Fatal("the service manager logged no end of the service")
	case n != 0:
		t.Errorf("after a requested stop the fd store still holds %d entries, want 0", n)
	}
}
