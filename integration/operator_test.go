package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorolling/gorolling/master/events"
)

// The tests of this file cover what an operator sees of several masters
// on one host: ls, and two services that would share a name.

// TestLs lists two masters of one control directory, leaves out a stale
// socket, and prints the same data as JSON.
func TestLs(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ctl")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	a := startMaster(t, masterOpts{args: []string{"--control", filepath.Join(dir, "api.sock"), "-w", "2", "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	b := startMaster(t, masterOpts{args: []string{"--control", filepath.Join(dir, "web.sock"), "-w", "1", "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	a.waitServing()
	b.waitServing()
	// A master that was killed leaves its socket file behind.
	stale := filepath.Join(dir, "gone.sock")
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: stale}); err != nil {
		t.Fatal(err)
	}
	syscall.Close(fd)

	code, out, errOut := gorolling(t, nil, "ls", "--dir", dir, "--json")
	if code != 0 {
		t.Fatalf("ls --json: exit %d: %s", code, errOut)
	}
	var got []struct {
		Name       string `json:"name"`
		PID        int    `json:"pid"`
		Version    string `json:"version"`
		Generation int    `json:"generation"`
		Ready      int    `json:"workers_ready"`
		Workers    int    `json:"workers"`
		Upgrade    string `json:"upgrade"`
		Error      string `json:"error"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("ls --json: %v\n%s", err, out)
	}
	if len(got) != 2 || got[0].Name != "api" || got[1].Name != "web" {
		t.Fatalf("ls --json listed %+v, want api and web (not the stale socket)", got)
	}
	for i, want := range []struct {
		pid, workers int
	}{{a.cmd.Process.Pid, 2}, {b.cmd.Process.Pid, 1}} {
		e := got[i]
		if e.PID != want.pid || e.Generation != 1 || e.Ready != want.workers || e.Workers != want.workers || e.Version == "" || e.Error != "" {
			t.Errorf("%s: %+v, want pid %d, generation 1, %d/%d ready", e.Name, e, want.pid, want.workers, want.workers)
		}
	}

	code, out, errOut = gorolling(t, nil, "ls", "--dir", dir)
	if code != 0 {
		t.Fatalf("ls: exit %d: %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "NAME") {
		t.Fatalf("ls printed:\n%s", out)
	}
	for i, name := range []string{"api", "web"} {
		f := strings.Fields(lines[i+1])
		if len(f) < 7 || f[0] != name || f[4] != "1" || f[6] != "none" {
			t.Errorf("ls line %q: want %s, generation 1, no upgrade", lines[i+1], name)
		}
	}
	if f := strings.Fields(lines[1]); len(f) > 5 && f[5] != "2/2" {
		t.Errorf("api: ready %s, want 2/2", f[5])
	}

	// An empty directory: nothing on stdout, a word on stderr, exit 0.
	empty := t.TempDir()
	if code, out, errOut := gorolling(t, nil, "ls", "--dir", empty); code != 0 || out != "" || !strings.Contains(errOut, "no master runs") {
		t.Errorf("ls of an empty directory: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if code, out, _ := gorolling(t, nil, "ls", "--dir", empty, "--json"); code != 0 || strings.TrimSpace(out) != "[]" {
		t.Errorf("ls --json of an empty directory: exit %d, %q", code, out)
	}
}

// TestSameNameRefused: a second service started under the name of one
// that runs refuses to start, names --name, and leaves the first one's
// control socket to it, also when both start at the same moment over a
// stale socket file.
func TestSameNameRefused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ctl")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	ctl := filepath.Join(dir, "app.sock")
	args := func() []string {
		return []string{"exec", "--log-format", "json", "--control", ctl, "-w", "1", "--", binPath("example-server"), "-listen", "127.0.0.1:0"}
	}
	for round := 0; round < 5; round++ {
		// Leave a stale socket where both will look.
		os.Remove(ctl)
		fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: ctl}); err != nil {
			t.Fatal(err)
		}
		syscall.Close(fd)

		var cmds [2]*exec.Cmd
		var errs [2]*strings.Builder
		var reaped [2]atomic.Bool
		exited := make(chan int, 2)
		for i := range cmds {
			cmds[i] = exec.Command(binPath("gorolling"), args()...)
			errs[i] = &strings.Builder{}
			cmds[i].Stderr = errs[i]
			if err := cmds[i].Start(); err != nil {
				t.Fatal(err)
			}
			c, r := cmds[i], &reaped[i]
			t.Cleanup(func() {
				if !r.Load() {
					c.Process.Signal(syscall.SIGKILL)
				}
			})
		}
		for i := range cmds {
			go func() {
				cmds[i].Wait()
				reaped[i].Store(true)
				exited <- i
			}()
		}
		// One of them must give up, quickly and with the reason.
		var loser int
		select {
		case loser = <-exited:
		case <-time.After(30 * time.Second):
			t.Fatalf("round %d: both masters run under one name", round)
		}
		winner := 1 - loser
		if code := cmds[loser].ProcessState.ExitCode(); code != 1 || !strings.Contains(errs[loser].String(), "--name") {
			t.Fatalf("round %d: the second master exited %d: %s", round, code, errs[loser].String())
		}
		// The control socket is the survivor's.
		st := statusOf(t, ctl)
		if pid := int(st["pid"].(float64)); pid != cmds[winner].Process.Pid {
			t.Fatalf("round %d: the control socket answers for pid %d, want the running master %d", round, pid, cmds[winner].Process.Pid)
		}
		cmds[winner].Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(60 * time.Second):
			t.Fatalf("round %d: master %d did not stop", round, cmds[winner].Process.Pid)
		}
	}
}

// TestChdirFollowsSymlinkDeploys: with --chdir through a "current" symlink,
// each generation runs the release the symlink names when it starts: its
// working directory and its program (given relative to the directory),
// and keeps it for its respawns.
func TestChdirFollowsSymlinkDeploys(t *testing.T) {
	root := t.TempDir()
	for _, rel := range []string{"1", "2"} {
		d := filepath.Join(root, "releases", rel)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(binPath("testworker"), filepath.Join(d, "server")); err != nil {
			t.Fatal(err)
		}
	}
	current := filepath.Join(root, "current")
	flip := func(rel string) {
		t.Helper()
		tmp := current + ".new"
		os.Remove(tmp)
		if err := os.Symlink(filepath.Join("releases", rel), tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, current); err != nil {
			t.Fatal(err)
		}
	}
	flip("1")
	report := filepath.Join(t.TempDir(), "report")
	p := startMaster(t, masterOpts{
		dir:  "/",
		args: []string{"-w", "2", "--chdir", current, "--", "./server"},
		env:  []string{"TW_SCRIPT=cwd; listen tcp 127.0.0.1:0", "TW_REPORT=" + report},
	})
	p.waitServing()
	flip("2")
	// A crash in generation 1 after the switch: its respawn runs release
	// 1 still, the release its generation started with (a rollback keeps
	// its old code the same way).
	victim := p.workerPIDs(1)[0]
	from := len(p.entries())
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	p.waitLog(30*time.Second, from, "the respawned worker", func(e entry) bool {
		return e.event() == events.WorkerReady && e.num("generation") == 1
	})
	p.upgrade(60 * time.Second)
	for gen, workers := range map[int]int{1: 3, 2: 2} {
		want := filepath.Join(root, "releases", strconv.Itoa(gen))
		n := 0
		for _, r := range readReports(t, report) {
			if r.Op != "cwd" || r.Gen != gen {
				continue
			}
			n++
			if r.Addr != want {
				t.Errorf("generation %d worker %d runs in %s, want %s", gen, r.PID, r.Addr, want)
			}
		}
		if n != workers {
			t.Errorf("generation %d: %d workers reported, want %d", gen, n, workers)
		}
	}
	// A --chdir that is not a directory is refused at start.
	if code, _, errOut := gorolling(t, nil, "exec", "--control", "none", "--chdir", filepath.Join(root, "nope"), "--", "./server"); code != 1 || !strings.Contains(errOut, "--chdir") {
		t.Errorf("--chdir to nothing: exit %d, %q", code, errOut)
	}
}

// TestWorkerLogPrefix: with --worker-log-prefix and --log-format json,
// every line a worker writes comes out of the master as a JSON record
// naming the worker, on the stream it was written to, and the relay
// leaves no descriptor behind after upgrades, even though every worker
// leaves a process behind that holds its output pipes.
func TestWorkerLogPrefix(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "app")
	orphans := filepath.Join(dir, "orphans")
	body := "#!/bin/sh\necho \"hello from slot $GOROLLING_SLOT\"\necho 'oops \"quoted\"' >&2\nsleep 20 &\necho $! >> " + orphans + "\nexec " + binPath("example-server") + " -listen 127.0.0.1:0\n"
	t.Cleanup(func() {
		b, _ := os.ReadFile(orphans)
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	p := startMaster(t, masterOpts{args: []string{"-w", "2", "--worker-log-prefix", "--", script}})
	p.waitServing()
	fds := func() int {
		ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.cmd.Process.Pid))
		return len(ents)
	}
	base := fds()
	for i := 0; i < 3; i++ {
		p.upgrade(60 * time.Second)
	}
	// Each generation's lines, from each stream.
	type rec struct {
		Module  string `json:"@module"`
		Message string `json:"@message"`
		Gen     int    `json:"generation"`
		Slot    int    `json:"slot"`
		PID     int    `json:"pid"`
		Stream  string `json:"stream"`
	}
	var stdout, stderr []rec
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		stdout, stderr = nil, nil
		p.mu.Lock()
		out := p.stdout.String()
		p.mu.Unlock()
		for _, l := range strings.Split(out, "\n") {
			var r rec
			if json.Unmarshal([]byte(l), &r) == nil && r.Module == "worker" {
				stdout = append(stdout, r)
			}
		}
		for _, e := range p.entries() {
			if e.str("@module") == "worker" {
				stderr = append(stderr, rec{Module: "worker", Message: e.str("@message"), Gen: e.num("generation"), Slot: e.num("slot"), PID: e.num("pid"), Stream: e.str("stream")})
			}
		}
		if len(stdout) >= 8 && len(stderr) >= 8 || time.Now().After(end) {
			break
		}
	}
	if len(stdout) != 8 || len(stderr) != 8 {
		t.Fatalf("%d stdout and %d stderr records from 4 generations of 2 workers, want 8 each", len(stdout), len(stderr))
	}
	for _, r := range stdout {
		pids := p.workerPIDs(r.Gen)
		if r.Message != fmt.Sprintf("hello from slot %d", r.Slot) || r.Stream != "stdout" || !slices.Contains(pids, r.PID) {
			t.Errorf("stdout record %+v (generation %d workers %v)", r, r.Gen, pids)
		}
	}
	for _, r := range stderr {
		if r.Message != `oops "quoted"` || r.Stream != "stderr" || r.Gen < 1 || r.Gen > 4 {
			t.Errorf("stderr record %+v", r)
		}
	}
	// The relays of the drained generations closed their pipes, though the
	// sleeps those workers left behind (20 s) still hold them.
	for end := time.Now().Add(5 * time.Second); fds() != base; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("the master holds %d descriptors after 3 upgrades, %d before", fds(), base)
		}
	}
}
