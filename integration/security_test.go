package integration

// The adversarial suite: workers that run as an unprivileged account and
// attack the root master with every path, option and byte they control,
// and faults that must not block the next deploy. Every test runs real
// processes as root.

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorolling/gorolling/master/events"
	"github.com/gorolling/gorolling/master/placement"
	"golang.org/x/sys/unix"
)

// TestAttackSymlinkSwap: nobody workers swap a directory of the paths they
// ask for with a symlink to a root-owned directory, as fast as they can, for
// 20 s, while every generation asks for new unix sockets under it and the
// old generation's sockets are removed. Every operation on those paths must
// run with the workers' own rights, so the root-owned probe files behind the
// symlink keep their owner, mode and content, and no file appears there.
func TestAttackSymlinkSwap(t *testing.T) {
	requireRoot(t)
	uid, gid := nobodyIDs(t)
	base := openDir(t)
	target := filepath.Join(base, "rootdir")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	const workers, per = 4, 30
	probes := map[string]fileID{}
	for g := 0; g < 2; g++ {
		for s := 0; s < workers; s++ {
			for i := 0; i < per; i++ {
				name := fmt.Sprintf("p%d_%d_%d", g, s, i)
				path := filepath.Join(target, name)
				if err := os.WriteFile(path, []byte("probe "+name+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
				probes[name] = identify(t, path)
			}
		}
	}
	att := filepath.Join(base, "att")
	for _, d := range []string{att, filepath.Join(att, "sw")} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		os.Chown(d, uid, gid)
	}
	if err := os.Symlink(target, filepath.Join(att, "alt")); err != nil {
		t.Fatal(err)
	}
	os.Lchown(filepath.Join(att, "alt"), uid, gid)

	script := fmt.Sprintf("swap %s sw alt; listenmany %d unix %s/sw/p{gen2}_{slot}_{i}", att, per, att)
	p, report := nobodyMaster(t, workers, script, masterOpts{args: []string{"--drain-timeout", "5s"}})
	p.waitServing()
	deadline := time.Now().Add(20 * time.Second)
	upgrades := 0
	for time.Now().Before(deadline) {
		p.upgrade(60 * time.Second)
		upgrades++
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(60 * time.Second); code != 0 {
		t.Fatalf("master exited %d", code)
	}
	ok, failed := 0, 0
	for _, r := range opsOf(readReports(t, report), "listenmany", 0) {
		ok += r.OK
		failed += per - r.OK
	}
	t.Logf("%d upgrades; %d sockets created under the swapped path, %d refused", upgrades, ok, failed)
	if ok == 0 {
		t.Fatal("no listen succeeded: the attack never ran")
	}
	ents, err := os.ReadDir(target)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		want, isProbe := probes[e.Name()]
		if !isProbe {
			t.Errorf("a file appeared in the root-owned directory: %s", e.Name())
			continue
		}
		if got := identify(t, filepath.Join(target, e.Name())); got != want {
			t.Errorf("probe %s changed: %+v, was %+v", e.Name(), got, want)
		}
		delete(probes, e.Name())
	}
	for name := range probes {
		t.Errorf("probe %s was removed", name)
	}
}

// TestAttackStaleSocketInStickyDir: in a sticky, world-writable directory a
// stale socket file belongs to another account (daemon). The kernel would
// never let nobody remove it, so neither may the master on nobody's behalf.
func TestAttackStaleSocketInStickyDir(t *testing.T) {
	requireRoot(t)
	daemon, err := user.Lookup("daemon")
	if err != nil {
		t.Fatalf("no user daemon: %v", err)
	}
	duid, _ := strconv.Atoi(daemon.Uid)
	dgid, _ := strconv.Atoi(daemon.Gid)
	sticky := filepath.Join(openDir(t), "sticky")
	if err := os.Mkdir(sticky, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(sticky, 0o777|os.ModeSticky)
	sock := filepath.Join(sticky, "app.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close() // stale: nothing listens, connect gets ECONNREFUSED
	os.Chmod(sock, 0o777)
	os.Lchown(sock, duid, dgid)
	before := identify(t, sock)

	p, report := nobodyMaster(t, 1, "listen unix "+sock, masterOpts{})
	p.waitServing()
	rs := waitReports(t, report, 10*time.Second, "the listen", func(rs []twReport) bool { return len(opsOf(rs, "listen", 1)) == 1 })
	r := opsOf(rs, "listen", 1)[0]
	if r.Err == "" {
		t.Errorf("nobody got a socket in place of daemon's stale socket file")
	} else {
		t.Logf("the worker got: %s", r.Err)
	}
	if after := identify(t, sock); after != before {
		t.Fatalf("daemon's socket file changed: %+v, was %+v", after, before)
	}
}

// TestAttackNoSearchPermission: a directory nobody may write sits inside a
// directory nobody may not even search. The kernel refuses nobody a socket
// there, so the master must too.
func TestAttackNoSearchPermission(t *testing.T) {
	requireRoot(t)
	locked := filepath.Join(openDir(t), "locked")
	inner := filepath.Join(locked, "open")
	if err := os.MkdirAll(inner, 0o700); err != nil {
		t.Fatal(err)
	}
	os.Chmod(locked, 0o700)
	os.Chmod(inner, 0o777)
	sock := filepath.Join(inner, "app.sock")
	p, report := nobodyMaster(t, 1, "listen unix "+sock, masterOpts{})
	p.waitServing()
	rs := waitReports(t, report, 10*time.Second, "the listen", func(rs []twReport) bool { return len(opsOf(rs, "listen", 1)) == 1 })
	if r := opsOf(rs, "listen", 1)[0]; r.Errno != strconv.Itoa(int(syscall.EACCES)) || !strings.Contains(r.Err, "--listen") {
		t.Errorf("listen under a directory nobody cannot search: err %q errno %q, want EACCES naming --listen", r.Err, r.Errno)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("a socket file was created where nobody may not reach: %v", err)
	}
}

// TestAttackForeignReuseportGroup: a root service listens with SO_REUSEPORT.
// A nobody worker in --reuseport mode asks for the same address; the kernel
// would refuse nobody a place in root's group, so the worker gets an error
// and the root service keeps every one of 100 connections.
func TestAttackForeignReuseportGroup(t *testing.T) {
	requireRoot(t)
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return serr
	}}
	root, err := lc.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	accepted := make(chan struct{}, 1000)
	go func() {
		for {
			c, err := root.Accept()
			if err != nil {
				return
			}
			accepted <- struct{}{}
			c.Close()
		}
	}()
	addr := root.Addr().String()
	p, report := nobodyMaster(t, 2, "listen tcp "+addr, masterOpts{args: []string{"--reuseport"}})
	p.waitServing()
	rs := waitReports(t, report, 10*time.Second, "two listens", func(rs []twReport) bool { return len(opsOf(rs, "listen", 1)) == 2 })
	for _, r := range opsOf(rs, "listen", 1) {
		inUse, denied := strconv.Itoa(int(syscall.EADDRINUSE)), strconv.Itoa(int(syscall.EACCES))
		if r.Errno != inUse && !(r.Errno == denied && strings.Contains(r.Err, "--listen")) {
			t.Errorf("worker %d joined root's SO_REUSEPORT group: %+v", r.PID, r)
		}
	}
	for i := 0; i < 100; i++ {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	got := 0
	for timeout := time.After(5 * time.Second); got < 100; got++ {
		select {
		case <-accepted:
		case <-timeout:
			t.Fatalf("the root service accepted %d of 100 connections; the workers took the rest", got)
		}
	}
}

// TestAttackTerminal: an operator starts a root master with --user nobody
// from a shell. A nobody worker must not be able to push input into that
// shell through the terminal (TIOCSTI on its stdout, its stderr or
// /dev/tty), which root would run once the master exits: workers of
// another account get a session of their own and their output through
// pipes.
func TestAttackTerminal(t *testing.T) {
	requireRoot(t)
	ptm, pts := openPTY(t)
	// The terminal's output must be read, or the master blocks on it.
	go io.Copy(io.Discard, ptm)
	p, report := nobodyMaster(t, 1, "tiocsti echo INJECTED-BY-NOBODY", masterOpts{tty: pts})
	rs := waitReports(t, report, 15*time.Second, "the worker's try", func(rs []twReport) bool { return len(opsOf(rs, "tiocsti", 1)) == 1 })
	if took := opsOf(rs, "tiocsti", 1)[0].Addr; took != "" {
		t.Errorf("a nobody worker pushed input into the master's terminal through %s", took)
	}
	p.signal(syscall.SIGTERM)
	p.wait(30 * time.Second)
}

// openPTY opens a pseudo-terminal pair: the master side and the terminal.
func openPTY(t *testing.T) (ptm, pts *os.File) {
	t.Helper()
	fd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ptm = os.NewFile(uintptr(fd), "/dev/ptmx")
	t.Cleanup(func() { ptm.Close() })
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetUint32(fd, unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	pts, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pts.Close() })
	return ptm, pts
}

// TestAttackCrashLoopAddresses: a worker that asks for 200 new addresses at
// every start and then crashes must not swell the master: sockets that no
// live worker holds are collected whenever a worker exits.
func TestAttackCrashLoopAddresses(t *testing.T) {
	// The reference: the same master with two workers that behave. Its
	// count is taken before the crash loop exists, so the bound below does
	// not move with what the loop has already piled up.
	ref := startMaster(t, masterOpts{
		args: []string{"-w", "2", "--ready-timeout", "2s", "--", binPath("testworker")},
		env:  []string{"TW_SCRIPT=listen tcp 127.0.0.1:0"},
	})
	ref.waitServing()
	base := fdCount(t, ref.pid)
	ref.signal(syscall.SIGTERM)
	ref.wait(30 * time.Second)

	p := startMaster(t, masterOpts{
		args: []string{"-w", "2", "--ready-timeout", "2s", "--", binPath("testworker")},
		env:  []string{"TW_SCRIPT=slot1: listenmany 200 tcp 127.0.{id200}.{i}:0; slot1: crash; listen tcp 127.0.0.1:0"},
	})
	p.waitServing()
	highest := fdCount(t, p.pid)
	for end := time.Now().Add(9 * time.Second); time.Now().Before(end); {
		highest = max(highest, fdCount(t, p.pid))
		time.Sleep(100 * time.Millisecond)
	}
	starts := 0
	for _, e := range p.entries() {
		if e.event() == events.WorkerOnline && e.num("slot") == 1 {
			starts++
		}
	}
	t.Logf("slot 1 started %d times; master descriptors: %d for two healthy workers, at most %d under the crash loop", starts, base, highest)
	if starts < 4 {
		t.Fatalf("slot 1 started only %d times: the crash loop did not run", starts)
	}
	// A dead worker's sockets stay pinned while its successor starts (the
	// successor may ask for the same keys), and go when that one exits
	// too: two workers' 200 at most. Even spreading steers at most
	// placement.MaxGroups of their groups, at four descriptors each.
	// Without collection at exit, four starts alone hold 800 sockets.
	if limit := base + 2*200 + 4*placement.MaxGroups + 40; highest > limit {
		t.Fatalf("master grew from %d to %d descriptors (limit %d): sockets of dead workers are not collected", base, highest, limit)
	}
}

// TestAttackManySocketsSelfUpgrade: 2,000 sockets go through a master
// self-upgrade with a send buffer forced small, so the state can only pass
// if it is streamed to a successor that is already reading.
func TestAttackManySocketsSelfUpgrade(t *testing.T) {
	const workers, per = 8, 250
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "pid")
	p, report := twMaster(t, workers, fmt.Sprintf("listenmany %d tcp 127.0.{slot}.9:0", per), masterOpts{
		args: []string{"--max-sockets", "4096", "--pid-file", pidFile},
		env:  []string{"GOROLLING_STATE_SNDBUF=4096"},
	})
	rs := waitReports(t, report, 30*time.Second, "every listen", func(rs []twReport) bool { return len(opsOf(rs, "listenmany", 1)) == workers })
	for _, r := range opsOf(rs, "listenmany", 1) {
		if r.OK != per {
			t.Fatalf("worker %d got %d of %d sockets: %s", r.PID, r.OK, per, r.Err)
		}
	}
	before := statusOf(t, p.controlPath())["listeners"].([]any)
	if len(before) < workers*per {
		t.Fatalf("the master holds %d sockets, want %d", len(before), workers*per)
	}
	done := make(chan struct{})
	var code int
	var out, errOut string
	go func() {
		defer close(done)
		code, out, errOut = gorolling(t, nil, "upgrade", "--master", "--wait", "--timeout", "90s", "--control", p.controlPath())
	}()
	select {
	case <-done:
	case <-time.After(100 * time.Second):
		t.Fatal("the master upgrade with 2,000 sockets hangs")
	}
	if code != 0 {
		t.Fatalf("upgrade --master: exit %d: %s %s", code, out, errOut)
	}
	st := statusOf(t, p.controlPath())
	after := st["listeners"].([]any)
	addrs := func(ls []any) []string {
		var out []string
		for _, l := range ls {
			out = append(out, l.(map[string]any)["address"].(string))
		}
		slices.Sort(out)
		return out
	}
	if !slices.Equal(addrs(before), addrs(after)) {
		t.Fatalf("the new master holds %d sockets, the old one held %d, or their ports differ", len(after), len(before))
	}
	if int(st["pid"].(float64)) == p.pid {
		t.Fatal("status still answers from the old master")
	}
	get(t, addrs(after)[0])
}

// TestAttackBrokenGorollingBinary: the gorolling binary on disk is replaced
// by one that cannot start. A HUP must still roll the application forward
// (a workers upgrade), logged with the master's failure; the next HUP does
// not retry the master until the binary changes again; status shows the

// TestAttackBrokenGorollingBinaryPrivDrop: the packaged setup, workers as
// nobody with a --listen socket, so that every worker starts through the
// LISTEN_PID shim, which runs from the gorolling binary. With that binary
// replaced by a broken one, a HUP still rolls the application (the shim
// runs from the running master's own file, not the one on disk), and a
// worker of the new generation that dies is started again.
func TestAttackBrokenGorollingBinaryPrivDrop(t *testing.T) {
	requireRoot(t)
	dir := openDir(t)
	gr := filepath.Join(dir, "gorolling")
	replaceFile(t, gr, readFile(t, binPath("gorolling")))
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	p := startMaster(t, masterOpts{bin: gr, args: []string{"-w", "2", "--user", "nobody", "--listen", "tcp://" + addr, "--", binPath("example-server"), "-listen", addr}})
	p.waitServing()
	replaceFile(t, gr, []byte("#!/bin/sh\necho broken gorolling >&2\nexit 1\n"))
	if gen := p.upgrade(60 * time.Second); gen != 2 {
		t.Fatalf("a HUP after a broken gorolling binary: generation %d, want 2", gen)
	}
	if _, gen := get(t, addr); gen != 2 {
		t.Fatalf("generation %d serves after the HUP, want 2", gen)
	}
	victims := p.workerPIDs(2)
	if len(victims) == 0 {
		t.Fatal("no worker of generation 2")
	}
	from := len(p.entries())
	syscall.Kill(victims[0], syscall.SIGKILL)
	p.waitLog(30*time.Second, from, "the respawned worker", func(e entry) bool {
		return e.event() == events.WorkerReady && e.num("generation") == 2
	})
}

// failure; and failed tries leak no descriptor.
func TestAttackBrokenGorollingBinary(t *testing.T) {
	dir := t.TempDir()
	gr := filepath.Join(dir, "gorolling")
	good := readFile(t, binPath("gorolling"))
	replaceFile(t, gr, good)
	p := startMaster(t, masterOpts{bin: gr, args: []string{"-w", "2", "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	p.waitServing()
	addr := p.listenAddr(5 * time.Second)
	l := startLoad(t, addr, 8, true)
	replaceFile(t, gr, []byte("#!/bin/sh\necho broken gorolling >&2\nexit 1\n"))

	from := len(p.entries())
	p.signal(syscall.SIGHUP)
	e, _ := p.waitLog(60*time.Second, from, "the fallback", func(e entry) bool {
		return e.event() == events.UpgradeFinished || e.event() == events.UpgradeRolledBack
	})
	if e.event() != events.UpgradeFinished || e.num("generation") != 2 {
		t.Fatalf("a HUP after a broken gorolling binary: %v", e)
	}
	if _, gen := get(t, addr); gen != 2 {
		t.Fatalf("generation %d serves after the HUP, want 2", gen)
	}
	fb, _ := p.waitLog(time.Second, from, "the fallback log", isEvent(events.MasterUpgradeFallback))
	if !strings.Contains(fb.str("reason"), "exited before it was ready") {
		t.Errorf("fallback logged with reason %q", fb.str("reason"))
	}
	st := statusOf(t, p.controlPath())
	mf, _ := st["master_upgrade_failure"].(map[string]any)
	if mf == nil || !strings.Contains(fmt.Sprint(mf["error"]), "exited before it was ready") {
		t.Errorf("status does not show the failed master upgrade: %v", st["master_upgrade_failure"])
	}
	code, human, _ := gorolling(t, nil, "status", "--control", p.controlPath())
	if code != 0 || !strings.Contains(human, "upgrade failed") {
		t.Errorf("human status does not show the failed master upgrade:\n%s", human)
	}

	// The same broken binary: no new master attempt, the workers roll.
	from = len(p.entries())
	if gen := p.upgrade(60 * time.Second); gen != 3 {
		t.Fatalf("second HUP: generation %d, want 3", gen)
	}
	for _, e := range p.entries()[from:] {
		if e.event() == events.MasterUpgradeStarted {
			t.Errorf("the second HUP retried the unchanged broken binary")
		}
	}

	// Failed explicit tries leak nothing.
	baseFDs := fdCount(t, p.pid)
	for i := 0; i < 3; i++ {
		if code, _, _ := gorolling(t, nil, "upgrade", "--master", "--wait", "--control", p.controlPath()); code == 0 {
			t.Fatal("upgrade --master with a broken binary succeeded")
		}
	}
	for end := time.Now().Add(5 * time.Second); fdCount(t, p.pid) != baseFDs && time.Now().Before(end); {
		time.Sleep(100 * time.Millisecond)
	}
	if n := fdCount(t, p.pid); n != baseFDs {
		t.Errorf("master holds %d descriptors after 3 failed master upgrades, %d before (%v)", n, baseFDs, fdKinds(t, p.pid))
	}

	// A fixed binary is tried again by the next HUP, and the new master
	// gets this master's state, not one a failed try left queued: the
	// numbering goes on and its pid is known.
	replaceFile(t, gr, good)
	from = len(p.entries())
	p.signal(syscall.SIGHUP)
	e, _ = p.waitLog(60*time.Second, from, "the old master's view of the upgrade", isEvent(events.MasterUpgradeReady))
	if e.num("new_pid") <= 0 {
		t.Errorf("the new master's pid is unknown: %v", e)
	}
	st = statusOf(t, p.controlPath())
	if int(st["pid"].(float64)) != e.num("new_pid") || int(st["generation"].(float64)) != 4 {
		t.Errorf("after the good master upgrade: pid %v generation %v, want %d and 4", st["pid"], st["generation"], e.num("new_pid"))
	}
	if _, gen := get(t, addr); gen != 4 {
		t.Errorf("generation %d serves, want 4", gen)
	}
	l.requireNoFailures(t)
}

// TestAttackNotifyFlood: a worker floods its notify socket from 8
// goroutines; the master stays responsive (status answers within a second)
// and logs the throttling once.
func TestAttackNotifyFlood(t *testing.T) {
	p, _ := twMaster(t, 2, "slot1: notifyflood 8s; listen tcp 127.0.0.1:0", masterOpts{args: []string{"--log-level", "info"}})
	ctl := p.controlPath()
	time.Sleep(time.Second)
	var slowest time.Duration
	for i := 0; i < 10; i++ {
		slowest = max(slowest, statusLatency(t, ctl))
		time.Sleep(300 * time.Millisecond)
	}
	t.Logf("slowest status during the flood: %s", slowest)
	if slowest > time.Second {
		t.Errorf("status took %s during a notify flood, want under 1s", slowest)
	}
	if n := p.count(isEvent(events.WorkerThrottled)); n != 1 {
		t.Errorf("throttling logged %d times, want once", n)
	}
}

// TestAttackIdleControlClients: 200 clients connect to the control socket
// and never send; status still answers.
func TestAttackIdleControlClients(t *testing.T) {
	p := startMaster(t, masterOpts{args: []string{"-w", "1", "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
	p.waitServing()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < 200; i++ {
		c, err := net.Dial("unix", p.controlPath())
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns = append(conns, c)
	}
	if d := statusLatency(t, p.controlPath()); d > time.Second {
		t.Fatalf("status took %s behind 200 idle clients", d)
	}
	if code, _, errOut := gorolling(t, nil, "status", "--control", p.controlPath()); code != 0 {
		t.Fatalf("gorolling status behind 200 idle control clients: %s", errOut)
	}
	if n := fdCount(t, p.pid); n > 150 {
		t.Errorf("the master holds %d descriptors for idle control clients", n)
	}
}

// TestControlDirectoryMustBePrivate: a control directory the master's user
// does not own, or one with a mode other than 0700, stops the master at
// start with a message naming it.
func TestControlDirectoryMustBePrivate(t *testing.T) {
	requireRoot(t)
	uid, gid := nobodyIDs(t)
	for _, tc := range []struct {
		name  string
		setup func(dir string)
	}{
		{"owned by another user", func(dir string) { os.Chown(dir, uid, gid) }},
		{"mode 0755", func(dir string) { os.Chmod(dir, 0o755) }},
		{"a symlink", func(dir string) {
			os.Remove(dir)
			os.Symlink(t.TempDir(), dir)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(openDir(t), "ctl")
			os.Mkdir(dir, 0o700)
			tc.setup(dir)
			p := startMaster(t, masterOpts{args: []string{"-w", "1", "--control", filepath.Join(dir, "c.sock"), "--", binPath("example-server"), "-listen", "127.0.0.1:0"}})
			if code := p.wait(30 * time.Second); code != 1 {
				t.Fatalf("master exited %d, want 1", code)
			}
			p.mu.Lock()
			last := p.lines[len(p.lines)-1]
			p.mu.Unlock()
			if !strings.Contains(last, dir) || !strings.Contains(last, "0700") {
				t.Fatalf("last line %q, want the directory and the rule", last)
			}
		})
	}
}

// TestClientChecksServerCredentials: the CLI believes only a control socket
// served by root or by its own user.
func TestClientChecksServerCredentials(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(openDir(t), "fake")
	os.Mkdir(dir, 0o777)
	os.Chmod(dir, 0o777)
	sock := filepath.Join(dir, "c.sock")
	uid, gid := nobodyIDs(t)
	cmd := exec.Command(binPath("testworker"))
	cmd.Env = append(os.Environ(), "TW_SCRIPT=fakecontrol "+sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if fi, err := os.Stat(sock); err == nil && fi.Mode().Perm() == 0o777 {
			break
		}
		if time.Now().After(end) {
			t.Fatal("the fake server did not start")
		}
	}
	code, stdout, errOut := gorolling(t, nil, "status", "--control", sock)
	if code == 0 || strings.Contains(stdout, "forged") || !strings.Contains(errOut, "served by uid "+strconv.Itoa(uid)) {
		t.Fatalf("status believed a server run by uid %d: exit %d, stdout %q, stderr %q", uid, code, stdout, errOut)
	}
}

// TestStatusTextSanitised: a worker's STATUS= text reaches the operator's
// terminal without control characters.
func TestStatusTextSanitised(t *testing.T) {
	p, _ := twMaster(t, 1, `notify STATUS=\e[2J\e[31mevil\a; listen tcp 127.0.0.1:0`, masterOpts{})
	var human string
	for end := time.Now().Add(10 * time.Second); !strings.Contains(human, "evil"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("the status text never showed:\n%s", human)
		}
		_, human, _ = gorolling(t, nil, "status", "--control", p.controlPath())
	}
	_, js, _ := gorolling(t, nil, "status", "--json", "--control", p.controlPath())
	for _, out := range []string{human, js} {
		if strings.ContainsAny(out, "\x1b\a") || strings.Contains(out, `\u001b`) || strings.Contains(out, `\u0007`) {
			t.Errorf("status output carries the worker's control characters: %q", out)
		}
	}
}

// TestNonblockReasserted: a worker that switches its shared socket to
// blocking mode (it belongs to every holder's open file description) does
// not leave it so: the master sets O_NONBLOCK again whenever it hands the
// socket out.
func TestNonblockReasserted(t *testing.T) {
	p, _ := twMaster(t, 1, "listen tcp 127.0.0.1:0; gen1: blockall", masterOpts{args: []string{"--drain-timeout", "2s"}})
	time.Sleep(300 * time.Millisecond)
	if len(blockingSockets(t, p.pid)) == 0 {
		t.Fatal("the worker's blockall did not reach the master's copy: the test proves nothing")
	}
	p.upgrade(30 * time.Second)
	if b := blockingSockets(t, p.pid); len(b) > 0 {
		t.Fatalf("master sockets still in blocking mode after they were handed out again: fds %v", b)
	}
}

// TestRegistryCaps: past --max-sockets, or past 256 sockets for one worker,
// a listen gets a clear errno (ENFILE, EMFILE) and the worker keeps
// running; the master logs each cap once per worker.
func TestRegistryCaps(t *testing.T) {
	p, report := twMaster(t, 1, "listenmany 300 tcp 127.0.0.1:0", masterOpts{})
	rs := waitReports(t, report, 20*time.Second, "300 listens", func(rs []twReport) bool { return len(opsOf(rs, "listenmany", 1)) == 1 })
	r := opsOf(rs, "listenmany", 1)[0]
	if r.OK != 256 || r.Errno != strconv.Itoa(int(syscall.EMFILE)) {
		t.Errorf("one worker asked for 300 sockets: got %d, then %q (errno %s); want 256, then EMFILE", r.OK, r.Err, r.Errno)
	}
	if n := p.count(isEvent(events.ListenRefused)); n != 1 {
		t.Errorf("per-worker cap logged %d times, want once", n)
	}

	p2, report2 := twMaster(t, 2, "slot0: listen tcp 127.0.0.1:0; slot1: listenmany 20 tcp 127.0.1.{i}:0", masterOpts{args: []string{"--max-sockets", "10"}})
	rs = waitReports(t, report2, 20*time.Second, "the listens", func(rs []twReport) bool { return len(opsOf(rs, "listenmany", 1)) == 1 })
	r = opsOf(rs, "listenmany", 1)[0]
	if r.OK != 9 || r.Errno != strconv.Itoa(int(syscall.ENFILE)) || !strings.Contains(r.Err, "--max-sockets") {
		t.Errorf("20 sockets past --max-sockets 10: got %d, then %q (errno %s); want 9, then ENFILE naming --max-sockets", r.OK, r.Err, r.Errno)
	}
	if n := p2.count(isEvent(events.ListenRefused)); n != 1 {
		t.Errorf("registry cap logged %d times, want once", n)
	}
	if !alive(p2.workerPIDs(1)[1]) {
		t.Error("the worker past the cap was stopped")
	}
}

// TestMainPIDFromOldMaster: with NotifyAccess=main systemd believes only
// the main process, so after a self-upgrade the old master itself tells
// systemd its successor's pid, and nothing else reaches systemd's socket
// from the new master before that.
func TestMainPIDFromOldMaster(t *testing.T) {
	dir := t.TempDir()
	sock, notes := listenNotify(t)
	pidFile := filepath.Join(dir, "pid")
	p := startMaster(t, masterOpts{args: []string{"-w", "1", "--pid-file", pidFile, "--", binPath("example-server"), "-listen", "127.0.0.1:0"}, env: []string{"NOTIFY_SOCKET=" + sock}})
	p.waitServing()
	newPID := masterUpgrade(t, p, pidFile)
	seenMain := false
	for timeout := time.After(5 * time.Second); !seenMain; {
		select {
		case n := <-notes:
			switch {
			case n.pid != p.pid && !seenMain:
				t.Fatalf("pid %d (new master %d) sent %q before the old master named it the main pid", n.pid, newPID, n.text)
			case strings.Contains(n.text, "MAINPID="):
				if n.pid != p.pid || !strings.Contains(n.text, "MAINPID="+strconv.Itoa(newPID)) || !strings.Contains(n.text, "READY=1") {
					t.Fatalf("pid %d sent %q; want the old master %d to send MAINPID=%d and READY=1", n.pid, n.text, p.pid, newPID)
				}
				seenMain = true
			}
		case <-timeout:
			t.Fatal("nobody sent MAINPID=")
		}
	}
}
