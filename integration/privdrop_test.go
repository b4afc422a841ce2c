package integration

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorolling/gorolling/master/events"
)

// TestPrivilegeDrop: with --user nobody the workers run as nobody with its
// supplementary groups and still serve on a privileged port the master
// pre-opened; they cannot get an undeclared privileged port, cannot reach
// the control socket, and can use their notify socket.
func TestPrivilegeDrop(t *testing.T) {
	requireRoot(t)
	nobody, err := user.Lookup("nobody")
	if err != nil {
		t.Fatalf("no user nobody: %v", err)
	}
	wantGroups, _ := nobody.GroupIds()
	slices.Sort(wantGroups)

	// Files the workers write must be theirs to write.
	dir := t.TempDir()
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	os.Chmod(dir, 0o777)
	report := filepath.Join(dir, "report.jsonl")
	priv := privilegedPort(t, 0)
	undeclared := privilegedPort(t, priv)
	ctl := privateControl(t)
	addr := "127.0.0.1:" + strconv.Itoa(priv)
	script := fmt.Sprintf("listen tcp %s; listen tcp 127.0.0.1:%d; dial unix %s; noready; notify READY=1", addr, undeclared, ctl)
	p := startMaster(t, masterOpts{
		args: []string{"-w", "2", "--user", "nobody", "--listen", "tcp://" + addr, "--control", ctl, "--", binPath("testworker")},
		env:  []string{"TW_SCRIPT=" + script, "TW_REPORT=" + report},
	})
	p.waitServing()
	rs := waitReports(t, report, 10*time.Second, "the workers' reports", func(rs []twReport) bool {
		return len(opsOf(rs, "notify", 1)) == 2
	})
	for _, r := range rs {
		switch {
		case r.Op == "listen" && r.Arg == "tcp "+addr:
			if r.Err != "" {
				t.Errorf("worker %d: the pre-declared privileged port: %s", r.PID, r.Err)
			}
		case r.Op == "listen":
			if r.Errno != strconv.Itoa(int(syscall.EACCES)) || !strings.Contains(r.Err, "--listen") {
				t.Errorf("worker %d got an undeclared privileged port: %+v", r.PID, r)
			}
		case r.Op == "dial":
			if !strings.Contains(r.Err, "permission denied") {
				t.Errorf("worker %d reached the control socket: %q", r.PID, r.Err)
			}
		case r.Op == "notify" && r.Err != "":
			t.Errorf("worker %d could not notify: %s", r.PID, r.Err)
		}
	}
	for _, e := range p.entries() {
		if e.event() == events.WorkerReady && e.str("via") != "notify" {
			t.Errorf("worker ready via %s, want notify", e.str("via"))
		}
	}
	for _, pid := range p.workerPIDs(1) {
		uid, gid, groups := procIDs(t, pid)
		slices.Sort(groups)
		if uid != nobody.Uid || gid != nobody.Gid || !slices.Equal(groups, wantGroups) {
			t.Errorf("worker %d runs as uid %s gid %s groups %v; want %s %s %v", pid, uid, gid, groups, nobody.Uid, nobody.Gid, wantGroups)
		}
	}
	if pid, _ := get(t, addr); !slices.Contains(p.workerPIDs(1), pid) {
		t.Fatalf("port %d served by %d, not a worker", priv, pid)
	}
	if uid, _, _ := procIDs(t, p.pid); uid != "0" {
		t.Fatalf("master runs as uid %s, want root", uid)
	}
	// An upgrade spawns the new generation the same way.
	p.upgrade(30 * time.Second)
	if pid, gen := get(t, addr); gen != 2 || !slices.Contains(p.workerPIDs(2), pid) {
		t.Fatalf("after the upgrade served by %d of generation %d", pid, gen)
	}
}
