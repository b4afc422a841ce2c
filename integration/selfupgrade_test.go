package integration

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorolling/gorolling/master/events"
)

// TestMasterSelfUpgradeUnderLoad: five consecutive USR2s under the
// non-retrying load loop (keep-alive and new-connection clients at once):
// zero failed requests, the PID file names each new master, and one master
// runs at the end, serving the newest generation.
func TestMasterSelfUpgradeUnderLoad(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "master.pid")
	p := startMaster(t, masterOpts{args: []string{"-w", "3", "--pid-file", pidFile, "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	p.waitServing()
	addr := p.listenAddr(5 * time.Second)
	if got := readPID(t, pidFile); got != p.pid {
		t.Fatalf("pid file names %d, master is %d", got, p.pid)
	}
	ka := startLoad(t, addr, 16, true)
	nc := startLoad(t, addr, 16, false)
	time.Sleep(500 * time.Millisecond)
	seen := []int{p.pid}
	for i := 0; i < 5; i++ {
		pid := masterUpgrade(t, p, pidFile)
		if slices.Contains(seen, pid) {
			t.Fatalf("upgrade %d: pid %d again", i+1, pid)
		}
		seen = append(seen, pid)
		time.Sleep(300 * time.Millisecond)
	}
	ka.requireNoFailures(t)
	nc.requireNoFailures(t)
	if ms := masterPIDs(t, binPath("gorolling")); len(ms) != 1 || ms[0] != seen[len(seen)-1] {
		t.Fatalf("masters running: %v, want only %d", ms, seen[len(seen)-1])
	}
	if pid, gen := get(t, addr); gen != 6 || !slices.Contains(p.workerPIDs(6), pid) {
		t.Fatalf("served by pid %d of generation %d, want generation 6", pid, gen)
	}
	code, out, errOut := gorolling(t, nil, "status", "--json", "--control", p.controlPath())
	if code != 0 {
		t.Fatalf("status: %d %s", code, errOut)
	}
	var st struct {
		PID            int `json:"pid"`
		MasterUpgrades int `json:"master_upgrades"`
		Generation     int `json:"generation"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatal(err)
	}
	if st.PID != seen[5] || st.MasterUpgrades != 5 || st.Generation != 6 {
		t.Fatalf("status after 5 master upgrades: %+v", st)
	}
}

// TestMasterUpgradeBrokenBinary: a gorolling binary that exits 1 at once
// leaves the old master serving, with the reason logged and reported, and
// no request failed. Once the binary is good again, USR2 works.
func TestMasterUpgradeBrokenBinary(t *testing.T) {
	dir := t.TempDir()
	gr := filepath.Join(dir, "gorolling")
	good := readFile(t, binPath("gorolling"))
	replaceFile(t, gr, good)
	pidFile := filepath.Join(dir, "master.pid")
	p := startMaster(t, masterOpts{bin: gr, args: []string{"-w", "2", "--pid-file", pidFile, "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	p.waitServing()
	addr := p.listenAddr(5 * time.Second)
	l := startLoad(t, addr, 8, true)

	replaceFile(t, gr, []byte("#!/bin/sh\necho broken gorolling >&2\nexit 1\n"))
	code, _, errOut := gorolling(t, nil, "upgrade", "--master", "--wait", "--control", p.controlPath())
	if code == 0 || !strings.Contains(errOut, "exited before it was ready") {
		t.Fatalf("upgrade --master --wait with a broken binary: exit %d, %q", code, errOut)
	}
	e, _ := p.waitLog(10*time.Second, 0, "the failure", isEvent(events.MasterUpgradeFailed))
	if e.level() != "error" {
		t.Errorf("failure logged at %s", e.level())
	}
	if readPID(t, pidFile) != p.pid || !alive(p.pid) {
		t.Fatalf("the old master should still serve and own the pid file")
	}
	if pid, gen := get(t, addr); gen != 1 || !slices.Contains(p.workerPIDs(1), pid) {
		t.Fatalf("served by %d of generation %d", pid, gen)
	}

	replaceFile(t, gr, good)
	// HUP upgrades the master because the binary changed on disk.
	from := len(p.entries())
	p.signal(syscall.SIGHUP)
	p.waitLog(30*time.Second, from, "the new master", isEvent(events.MasterUpgradeServing))
	l.requireNoFailures(t)
}

// TestUpgradeWait: "gorolling upgrade --wait" exits 0 when the new
// generation took over, and non-zero with the reason when it was rolled
// back.
func TestUpgradeWait(t *testing.T) {
	dir := t.TempDir()
	app := filepath.Join(dir, "app")
	good := readFile(t, binPath("example-server"))
	replaceFile(t, app, good)
	p := startMaster(t, masterOpts{args: []string{"-w", "2", "--", app, "-listen", "127.0.0.1:0"}})
	p.waitServing()
	ctl := p.controlPath()

	code, out, errOut := gorolling(t, nil, "upgrade", "--wait", "--control", ctl)
	if code != 0 || !strings.Contains(out, "generation 2 replaced generation 1") {
		t.Fatalf("good upgrade: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	replaceFile(t, app, []byte("#!/bin/sh\nexec "+binPath("example-server")+" -crash-at-start\n"))
	code, out, errOut = gorolling(t, nil, "upgrade", "--wait", "--control", ctl)
	if code == 0 || !strings.Contains(errOut, "exit status 1 before the generation was ready") {
		t.Fatalf("crashing program: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if _, gen := get(t, p.listenAddr(time.Second)); gen != 2 {
		t.Fatalf("generation %d serves after the rollback, want 2", gen)
	}
	// A wait that times out is not a rollback: exit 3, and the upgrade
	// goes on to take over.
	replaceFile(t, app, []byte("#!/bin/sh\nexec "+binPath("example-server")+" -ready-delay 2s \"$@\"\n"))
	code, out, errOut = gorolling(t, nil, "upgrade", "--wait", "--timeout", "300ms", "--control", ctl)
	if code != 3 || !strings.Contains(errOut, "it goes on") {
		t.Fatalf("slow program, --timeout 300ms: exit %d, stdout %q, stderr %q; want 3 (still running)", code, out, errOut)
	}
	p.waitLog(30*time.Second, 0, "generation 4 serving", func(e entry) bool { return e.event() == events.UpgradeFinished && e.num("generation") == 4 })
	// Without --wait it only starts the upgrade.
	replaceFile(t, app, good)
	code, out, _ = gorolling(t, nil, "upgrade", "--control", ctl)
	if code != 0 || !strings.Contains(out, "upgrade started") {
		t.Fatalf("upgrade without --wait: %d %q", code, out)
	}
	p.waitLog(30*time.Second, 0, "generation 5", func(e entry) bool { return e.event() == events.UpgradeFinished && e.num("generation") == 5 })
}

// TestControlSocketSecurity: the socket is 0600; another user cannot
// connect, and if the file's permissions are opened up, SO_PEERCRED still
// refuses them; a malformed request gets an error and changes nothing.
func TestControlSocketSecurity(t *testing.T) {
	requireRoot(t) // to run a client as another user
	// A control directory other users could traverse, were it not 0700.
	dir := t.TempDir()
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	ctl := filepath.Join(dir, "ctl", "control.sock")
	p := startMaster(t, masterOpts{args: []string{"-w", "1", "--control", ctl, "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	p.waitServing()
	if fi, err := os.Stat(filepath.Dir(ctl)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("control directory: %v %v, want mode 0700", fi.Mode(), err)
	}
	fi, err := os.Stat(ctl)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket mode %v, want 0600", fi.Mode().Perm())
	}
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
	code, _, errOut := gorolling(t, nobody, "status", "--control", ctl)
	if code == 0 || !strings.Contains(errOut, "permission denied") {
		t.Fatalf("nobody reached the control socket: exit %d %q", code, errOut)
	}
	// Open the path up: the master itself must refuse.
	os.Chmod(filepath.Dir(ctl), 0o755)
	os.Chmod(ctl, 0o666)
	code, _, errOut = gorolling(t, nobody, "stop", "--control", ctl)
	if code == 0 || !strings.Contains(errOut, "permission denied") {
		t.Fatalf("nobody controlled the master: exit %d %q", code, errOut)
	}
	e, _ := p.waitLog(5*time.Second, 0, "the refusal", isEvent(events.ControlRefused))
	if e.num("uid") != 65534 {
		t.Fatalf("refusal logged for uid %d", e.num("uid"))
	}
	for _, bad := range []string{"garbage\n", `{"cmd":"status","extra":1}` + "\n", `{"cmd":"explode"}` + "\n", strings.Repeat("x", 70000) + "\n"} {
		c, err := net.Dial("unix", ctl)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte(bad))
		buf := make([]byte, 4096)
		n, _ := c.Read(buf)
		c.Close()
		var resp struct {
			OK    bool   `json:"ok"`
			Error string `json:"error"`
		}
		if err := json.Unmarshal(buf[:n], &resp); err != nil || resp.OK || resp.Error == "" {
			t.Fatalf("malformed request %.40q answered %q", bad, buf[:n])
		}
	}
	if !alive(p.pid) {
		t.Fatal("master died")
	}
	if code, _, errOut := gorolling(t, nil, "status", "--control", ctl); code != 0 {
		t.Fatalf("status after bad requests: %d %s", code, errOut)
	}
}

// TestStatusAndScale: status --json matches the live processes; scale and
// TTIN/TTOU change the number of workers.
func TestStatusAndScale(t *testing.T) {
	p := startMaster(t, masterOpts{args: []string{"-w", "2", "--listen", "tcp://127.0.0.1:0?name=web", "--", binPath("testworker")},
		env: []string{"TW_SCRIPT=listen tcp 127.0.0.1:0"}})
	p.waitServing()
	ctl := p.controlPath()
	status := func() map[string]any { return statusOf(t, ctl) }
	st := status()
	if int(st["pid"].(float64)) != p.pid || int(st["generation"].(float64)) != 1 {
		t.Fatalf("status: %v", st)
	}
	var pids []int
	for _, x := range st["processes"].([]any) {
		w := x.(map[string]any)
		pids = append(pids, int(w["pid"].(float64)))
		if w["state"] != "ready" || !alive(int(w["pid"].(float64))) {
			t.Errorf("process %v", w)
		}
	}
	slices.Sort(pids)
	want := p.workerPIDs(1)
	slices.Sort(want)
	if !slices.Equal(pids, want) {
		t.Fatalf("status lists %v, live workers %v", pids, want)
	}
	kinds := map[string]bool{}
	for _, x := range st["listeners"].([]any) {
		l := x.(map[string]any)
		kinds[l["kind"].(string)] = true
		if gens := l["generations"].([]any); len(gens) != 1 || gens[0].(float64) != 1 {
			t.Errorf("listener %v: generations %v", l["key"], gens)
		}
	}
	if !kinds["shared"] || !kinds["pre-opened"] {
		t.Errorf("listener kinds %v", kinds)
	}
	code, human, _ := gorolling(t, nil, "status", "--control", ctl)
	if code != 0 || !strings.Contains(human, "generation 1, 2 workers") || !strings.Contains(human, "pre-opened") {
		t.Fatalf("human status:\n%s", human)
	}

	if code, out, errOut := gorolling(t, nil, "scale", "4", "--control", ctl); code != 0 {
		t.Fatalf("scale 4: %d %s %s", code, out, errOut)
	}
	waitWorkers := func(n int) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			st := status()
			ready := 0
			for _, x := range st["processes"].([]any) {
				if x.(map[string]any)["state"] == "ready" {
					ready++
				}
			}
			if ready == n && len(st["processes"].([]any)) == n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("want %d ready workers, status: %v", n, st["processes"])
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitWorkers(4)
	p.signal(syscall.SIGTTOU)
	waitWorkers(3)
	p.signal(syscall.SIGTTIN)
	waitWorkers(4)
	if code, _, errOut := gorolling(t, nil, "scale", "0", "--control", ctl); code == 0 || !strings.Contains(errOut, "at least 1") {
		t.Fatalf("scale 0 accepted: %s", errOut)
	}
	// The next generation has the new size.
	p.upgrade(30 * time.Second)
	if n := len(p.workerPIDs(2)); n != 4 {
		t.Fatalf("generation 2 has %d workers, want 4", n)
	}
	if code, out, errOut := gorolling(t, nil, "stop", "--control", ctl); code != 0 || !strings.Contains(out, "stopped master") {
		t.Fatalf("stop: %d %q %q", code, out, errOut)
	}
	if code := p.wait(10 * time.Second); code != 0 {
		t.Fatalf("master exited %d after stop", code)
	}
	if _, err := os.Stat(ctl); !os.IsNotExist(err) {
		t.Fatalf("control socket left after stop")
	}
}

// TestSystemdNotify: under systemd (NOTIFY_SOCKET) the master says READY=1
// once it serves; on a self-upgrade it says RELOADING=1, and then
// MAINPID=<the new master's pid> and READY=1, so Type=notify units follow
// it. Workers never see the master's NOTIFY_SOCKET: each has its own.
func TestSystemdNotify(t *testing.T) {
	dir := t.TempDir()
	sock, notes := listenNotify(t)
	next := func(want string) string {
		t.Helper()
		for {
			select {
			case n := <-notes:
				if strings.Contains(n.text, want) {
					return n.text
				}
			case <-time.After(30 * time.Second):
				t.Fatalf("no %q from the master", want)
			}
		}
	}
	pidFile := filepath.Join(dir, "pid")
	p, report := twMaster(t, 1, "env NOTIFY_SOCKET; listen tcp 127.0.0.1:0", masterOpts{args: []string{"--pid-file", pidFile}, env: []string{"NOTIFY_SOCKET=" + sock}})
	next("READY=1")
	newPID := masterUpgrade(t, p, pidFile)
	next("RELOADING=1")
	m := next("MAINPID=")
	if !strings.Contains(m, "MAINPID="+strconv.Itoa(newPID)) || !strings.Contains(m, "READY=1") {
		t.Fatalf("new master said %q, want MAINPID=%d and READY=1", m, newPID)
	}
	rs := waitReports(t, report, 10*time.Second, "the workers' environment", func(rs []twReport) bool { return len(opsOf(rs, "env", 0)) >= 2 })
	for _, r := range opsOf(rs, "env", 0) {
		if r.Env == "" || r.Env == sock {
			t.Errorf("worker %d has NOTIFY_SOCKET=%q; the master's is %s", r.PID, r.Env, sock)
		}
	}
}

// TestMasterUpgradeFailingGeneration: a new master whose own generation
// fails exits, and the old master keeps serving with every socket file it
// shares with it (unix listener, control socket) still in place.
func TestMasterUpgradeFailingGeneration(t *testing.T) {
	dir := t.TempDir()
	app := filepath.Join(dir, "app")
	good := readFile(t, binPath("testworker"))
	replaceFile(t, app, good)
	ctl := filepath.Join(dir, "ctl", "control.sock")
	p := startMaster(t, masterOpts{
		dir:  dir,
		args: []string{"-w", "2", "--ready-timeout", "3s", "--control", ctl, "--", app},
		env:  []string{"TW_SCRIPT=listen unix app.sock"},
	})
	p.waitServing()
	sock := filepath.Join(dir, "app.sock")
	replaceFile(t, app, []byte("#!/bin/sh\nexit 1\n"))
	code, _, errOut := gorolling(t, nil, "upgrade", "--master", "--wait", "--control", ctl)
	if code == 0 || !strings.Contains(errOut, "exited before it was ready") {
		t.Fatalf("upgrade --master with a failing program: exit %d %q", code, errOut)
	}
	for _, f := range []string{sock, ctl} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("the failed new master removed %s: %v", f, err)
		}
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("the unix listener stopped working: %v", err)
	}
	c.Close()
	if code, _, errOut := gorolling(t, nil, "status", "--control", ctl); code != 0 {
		t.Fatalf("control socket after the failed master upgrade: %s", errOut)
	}
	replaceFile(t, app, good)
	p.signal(syscall.SIGTERM)
	if code := p.wait(30 * time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket file left after the final stop")
	}
}
