package integration

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorolling/gorolling/master/events"
	"github.com/gorolling/gorolling/master/procfs"
)

// TestUpgradeUnderLoad: 32 non-retrying clients for at least 10 s while the
// master is HUPed 10 times, once with keep-alive connections and once with
// a new connection per request. Not one request may fail; every upgrade
// must complete; at the end only generation 11 serves, and the master holds
// as many descriptors as after start, all of its sockets non-blocking.
func TestUpgradeUnderLoad(t *testing.T) {
	for _, tc := range []struct {
		name      string
		keepAlive bool
	}{{"keepalive", true}, {"newconn", false}} {
		t.Run(tc.name, func(t *testing.T) { upgradeUnderLoad(t, tc.keepAlive) })
	}
}

func upgradeUnderLoad(t *testing.T, keepAlive bool) {
	const upgrades, minLoad = 10, 10 * time.Second
	p := startMaster(t, masterOpts{args: []string{"-w", "4", "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	p.waitServing()
	addr := p.listenAddr(5 * time.Second)
	baseFDs := fdCount(t, p.pid)

	start := time.Now()
	l := startLoad(t, addr, 32, keepAlive)
	time.Sleep(300 * time.Millisecond)
	for i := 0; i < upgrades; i++ {
		if gen := p.upgrade(60 * time.Second); gen != i+2 {
			t.Fatalf("upgrade %d: generation %d took over, want %d", i+1, gen, i+2)
		}
		// Spread the upgrades over the load period.
		if left := minLoad - time.Since(start); left > 0 {
			time.Sleep(left / time.Duration(upgrades-i))
		}
	}
	for time.Since(start) < minLoad {
		time.Sleep(50 * time.Millisecond)
	}
	ok, _ := l.counts()
	l.requireNoFailures(t)
	t.Logf("%d requests in %s", ok, time.Since(start).Round(time.Millisecond))

	if n := p.count(isEvent(events.UpgradeFinished)); n != upgrades {
		t.Errorf("%d upgrades finished, want %d", n, upgrades)
	}
	if n := p.count(isEvent(events.UpgradeRolledBack)); n != 0 {
		t.Errorf("%d upgrades rolled back", n)
	}
	last := upgrades + 1
	current := p.workerPIDs(last)
	if len(current) != 4 {
		t.Fatalf("generation %d has %d workers, want 4", last, len(current))
	}
	for i := 0; i < 40; i++ {
		pid, gen := get(t, addr)
		if gen != last || !slices.Contains(current, pid) {
			t.Fatalf("request served by pid %d of generation %d, want one of %v (generation %d)", pid, gen, current, last)
		}
	}
	for g := 1; g < last; g++ {
		for _, pid := range p.workerPIDs(g) {
			if alive(pid) && ours(pid) {
				t.Errorf("worker %d of generation %d still runs", pid, g)
			}
		}
	}
	if n := fdCount(t, p.pid); n != baseFDs {
		t.Errorf("master holds %d descriptors after %d upgrades, %d after start", n, upgrades, baseFDs)
	}
	if b := blockingSockets(t, p.pid); len(b) > 0 {
		t.Errorf("master sockets in blocking mode: fds %v", b)
	}
}

// TestRollback replaces the program by one that crashes at start, then by
// one that never becomes ready: each HUP rolls back with an error logged,
// the old generation serves throughout, and no request fails. A later good
// HUP succeeds.
func TestRollback(t *testing.T) {
	dir := t.TempDir()
	app := filepath.Join(dir, "app")
	good := readFile(t, binPath("example-server"))
	replaceFile(t, app, good)
	p := startMaster(t, masterOpts{args: []string{"-w", "2", "--ready-timeout", "2s", "--", app, "-listen", "127.0.0.1:0"}})
	p.waitServing()
	addr := p.listenAddr(5 * time.Second)
	l := startLoad(t, addr, 8, true)

	for _, tc := range []struct {
		name, script, reason string
	}{
		{"crash at start", "#!/bin/sh\nexec " + binPath("example-server") + " -crash-at-start \"$@\"\n", "exit status 1"},
		{"never ready", "#!/bin/sh\nexec " + binPath("example-server") + " -never-ready \"$@\"\n", "not ready within 2s"},
	} {
		replaceFile(t, app, []byte(tc.script))
		from := len(p.entries())
		p.signal(syscall.SIGHUP)
		e, _ := p.waitLog(30*time.Second, from, "a rollback ("+tc.name+")", func(e entry) bool {
			return e.event() == events.UpgradeRolledBack || e.event() == events.UpgradeFinished
		})
		if e.event() != events.UpgradeRolledBack {
			t.Fatalf("%s: upgrade went through", tc.name)
		}
		if e.level() != "error" || !strings.Contains(e.str("reason"), tc.reason) {
			t.Errorf("%s: rollback logged at %q with reason %q, want error level and %q", tc.name, e.level(), e.str("reason"), tc.reason)
		}
		if _, gen := get(t, addr); gen != 1 {
			t.Errorf("%s: after the rollback generation %d serves, want 1", tc.name, gen)
		}
		for _, pid := range p.workerPIDs(1) {
			if !alive(pid) {
				t.Errorf("%s: generation 1 worker %d died", tc.name, pid)
			}
		}
	}

	replaceFile(t, app, good)
	gen := p.upgrade(30 * time.Second)
	if gen != 4 {
		t.Errorf("good upgrade started generation %d, want 4", gen)
	}
	if _, g := get(t, addr); g != gen {
		t.Errorf("after the good upgrade generation %d serves, want %d", g, gen)
	}
	l.requireNoFailures(t)
}

// TestUpgradeRequestsCoalesce: HUPs sent while an upgrade runs lead to
// exactly one more upgrade.
func TestUpgradeRequestsCoalesce(t *testing.T) {
	p := startMaster(t, masterOpts{args: []string{"-w", "2", "--", binPath("example-server"), "-listen", "127.0.0.1:0", "-ready-delay", "500ms"}})
	p.waitServing()
	for i := 0; i < 5; i++ {
		p.signal(syscall.SIGHUP)
		time.Sleep(20 * time.Millisecond)
	}
	p.waitLog(30*time.Second, 0, "generation 3 to take over", func(e entry) bool {
		return e.event() == events.UpgradeFinished && e.num("generation") == 3
	})
	time.Sleep(1500 * time.Millisecond)
	if n := p.count(isEvent(events.UpgradeStarted)); n != 2 {
		t.Fatalf("%d upgrades started for 5 quick HUPs, want 2", n)
	}
}

// TestKillWorkerUnderLoad: kill -9 of one worker under load refills its
// slot; only requests on the killed worker's own connections may fail.
func TestKillWorkerUnderLoad(t *testing.T) {
	p := startMaster(t, masterOpts{args: []string{"-w", "4", "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	p.waitServing()
	addr := p.listenAddr(5 * time.Second)
	l := startLoad(t, addr, 16, true)
	time.Sleep(time.Second)

	var victim, slot int
	for _, e := range p.entries() {
		if e.event() == events.WorkerOnline && e.num("generation") == 1 && e.num("slot") == 2 {
			victim, slot = e.num("pid"), 2
		}
	}
	if victim <= 0 {
		t.Fatal("no worker of slot 2 was logged") // never signal pid 0
	}
	from := len(p.entries())
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	e, _ := p.waitLog(10*time.Second, from, "the slot's replacement", func(e entry) bool {
		return e.event() == events.WorkerReady && e.num("slot") == slot && e.num("generation") == 1 && e.num("pid") != victim
	})
	time.Sleep(time.Second)
	l.halt()
	ok, _ := l.counts()
	if ok == 0 {
		t.Fatal("no request succeeded")
	}
	for _, f := range l.failures {
		if f.lastPid != victim {
			t.Errorf("a request on a connection of pid %d failed (victim %d): %s", f.lastPid, victim, f.err)
		}
	}
	t.Logf("%d ok, %d failed on the killed worker's connections; slot %d refilled by pid %d", ok, len(l.failures), slot, e.num("pid"))
	if n := len(p.workerPIDs(1)); n != 5 {
		t.Errorf("%d workers started in generation 1, want 4 + 1 replacement", n)
	}
}

// TestStopSignals: TERM (and INT sent to the whole process group, as a
// terminal's Ctrl-C does) drains every worker, removes the unix socket
// file and exits 0 with no child left.
func TestStopSignals(t *testing.T) {
	for _, tc := range []struct {
		name  string
		group bool
		sig   syscall.Signal
	}{{"TERM", false, syscall.SIGTERM}, {"ctrl-c", true, syscall.SIGINT}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := startMaster(t, masterOpts{
				dir:  dir,
				args: []string{"-w", "2", "--", binPath("testworker")},
				env:  []string{"TW_SCRIPT=listen unix app.sock; listen tcp 127.0.0.1:0"},
			})
			p.waitServing()
			sock := filepath.Join(dir, "app.sock")
			if _, err := os.Stat(sock); err != nil {
				t.Fatalf("unix socket: %v", err)
			}
			pids := p.workerPIDs(1)
			// Workers lead process groups of their own, so a terminal's
			// Ctrl-C reaches only the master, which drains them in order.
			for _, pid := range pids {
				if st, err := procfs.ReadStat(pid); err != nil || st.PGrp != pid {
					t.Fatalf("worker %d is in process group %d (%v), want its own", pid, st.PGrp, err)
				}
			}
			// Everything the master started, to check after it is gone
			// (once it exits, its children are someone else's).
			started := append([]int(nil), pids...)
			for _, pid := range pids {
				started = append(started, children(pid)...)
			}
			started = append(started, children(p.pid)...)
			if tc.group {
				syscall.Kill(-p.pid, tc.sig)
			} else {
				p.signal(tc.sig)
			}
			if code := p.wait(30 * time.Second); code != 0 {
				t.Fatalf("master exited with %d, want 0", code)
			}
			for _, pid := range pids {
				if alive(pid) && ours(pid) {
					t.Errorf("worker %d still runs", pid)
				}
			}
			for _, pid := range started {
				if alive(pid) {
					t.Errorf("process %d, started by the master, outlived it", pid)
				}
			}
			if _, err := os.Stat(sock); !os.IsNotExist(err) {
				t.Errorf("unix socket file still there after stop (stat: %v)", err)
			}
			for _, e := range p.entries() {
				if e.event() == events.WorkerExited && e.str("status") != "exit status 0" {
					t.Errorf("worker %d ended with %s, want a clean drain", e.num("pid"), e.str("status"))
				}
			}
		})
	}
}

// TestFirstGenerationFailures: the master exits non-zero with a one-line
// reason when its first generation cannot start.
func TestFirstGenerationFailures(t *testing.T) {
	dir := t.TempDir()
	noexec := filepath.Join(dir, "noexec")
	if err := os.WriteFile(noexec, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"not found", []string{"--", filepath.Join(dir, "missing")}, "not found"},
		{"not executable", []string{"--", noexec}, "not executable"},
		{"every worker crashes", []string{"-w", "3", "--", binPath("example-server"), "-crash-at-start"}, "every worker exited before it was ready"},
		{"never ready", []string{"-w", "2", "--ready-timeout", "1s", "--", binPath("example-server"), "-listen", "127.0.0.1:0", "-never-ready"}, "no worker became ready within the ready timeout: context deadline exceeded (if the program cannot signal readiness (worker.Ready, or sd_notify READY=1 to $NOTIFY_SOCKET), use --ready=timer:DURATION)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startMaster(t, masterOpts{args: tc.args})
			code := p.wait(30 * time.Second)
			if code == 0 {
				t.Fatal("master exited 0")
			}
			p.mu.Lock()
			last := p.lines[len(p.lines)-1]
			p.mu.Unlock()
			if !strings.HasPrefix(last, "gorolling: ") || !strings.Contains(last, tc.want) {
				t.Fatalf("last stderr line %q, want a one-line reason containing %q", last, tc.want)
			}
			for _, pid := range p.allWorkerPIDs() {
				if alive(pid) && ours(pid) {
					t.Errorf("worker %d left running", pid)
				}
			}
		})
	}
}

// TestReusePortMode: with --reuseport every slot has its own socket, which
// its successors inherit: upgrades under load lose nothing, and the kernel
// spreads new connections over all workers.
func TestReusePortMode(t *testing.T) {
	p := startMaster(t, masterOpts{args: []string{"-w", "4", "--reuseport", "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	p.waitServing()
	addr := p.listenAddr(5 * time.Second)
	for _, keepAlive := range []bool{true, false} {
		l := startLoad(t, addr, 32, keepAlive)
		time.Sleep(300 * time.Millisecond)
		for i := 0; i < 3; i++ {
			p.upgrade(60 * time.Second)
			time.Sleep(300 * time.Millisecond)
		}
		l.requireNoFailures(t)
	}
	// Each slot's member socket is handed over, one per slot.
	members := map[string]bool{}
	for _, e := range p.entries() {
		if e.event() == events.ListenerHandedOver {
			members[e.str("key")] = true
		}
	}
	if len(members) != 4 {
		t.Fatalf("sockets handed over: %v, want 4 members", members)
	}
	// Spread: in a steady run with a new connection per request, every
	// worker of the serving generation takes a fair share.
	l := startLoad(t, addr, 16, false)
	time.Sleep(1500 * time.Millisecond)
	l.halt()
	gen := p.count(isEvent(events.UpgradeFinished)) + 1
	total := 0
	for _, n := range l.byPid {
		total += n
	}
	for _, pid := range p.workerPIDs(gen) {
		if share := float64(l.byPid[pid]) / float64(total); share < 0.10 {
			t.Errorf("worker %d took %.0f%% of %d connections", pid, share*100, total)
		}
	}
	t.Logf("spread over generation %d: %v of %d", gen, l.byPid, total)
}

// TestMasterDeath: workers whose master was SIGKILLed notice (end of file
// on the handoff channel, and the SIGTERM of Pdeathsig), drain and exit by
// themselves, finishing requests in flight.
func TestMasterDeath(t *testing.T) {
	p := startMaster(t, masterOpts{args: []string{"-w", "3", "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	p.waitServing()
	addr := p.listenAddr(5 * time.Second)
	pids := p.workerPIDs(1)
	// A request in flight when the master dies still gets its answer.
	done := make(chan error, 1)
	go func() {
		c := &http.Client{Timeout: 10 * time.Second}
		resp, err := c.Get("http://" + addr + "/?sleep=500ms")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode != 200 {
				err = fmt.Errorf("status %d", resp.StatusCode)
			}
		}
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	if err := syscall.Kill(p.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Errorf("request in flight when the master died: %v", err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for _, pid := range pids {
		for alive(pid) {
			if time.Now().After(deadline) {
				t.Fatalf("worker %d still runs 15s after its master died", pid)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// TestRequestLongerThanGraceAcrossHUP: a request that takes longer than the
// drain's keep-alive grace (2 s) is in flight when the HUP comes. The old
// worker answers it in full, and only then does its generation finish.
func TestRequestLongerThanGraceAcrossHUP(t *testing.T) {
	p := startMaster(t, masterOpts{args: []string{"-w", "2", "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	p.waitServing()
	addr := p.listenAddr(5 * time.Second)
	type answer struct {
		status, gen int
		body        string
		err         error
	}
	done := make(chan answer, 1)
	go func() {
		c := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err := c.Post("http://"+addr+"/?sleep=4s", "text/plain", strings.NewReader("slow"))
		if err != nil {
			done <- answer{err: err}
			return
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		gen, _ := strconv.Atoi(resp.Header.Get("X-Generation"))
		done <- answer{status: resp.StatusCode, gen: gen, body: string(b), err: err}
	}()
	time.Sleep(300 * time.Millisecond) // the request is in its handler
	start := time.Now()
	if gen := p.upgrade(60 * time.Second); gen != 2 {
		t.Fatalf("generation %d took over, want 2", gen)
	}
	took := time.Since(start)
	a := <-done
	if a.err != nil || a.status != 200 || a.gen != 1 {
		t.Fatalf("the slow request: status %d from generation %d, err %v", a.status, a.gen, a.err)
	}
	if took < 3*time.Second {
		t.Fatalf("the upgrade finished after %s, before the old worker's request ended", took)
	}
	t.Logf("upgrade finished %s after the HUP, once the 4 s request was answered", took.Round(time.Millisecond))
}
