package main

// Tests that run masters from the installed package: a package upgrade
// under load, which must re-exec the running master onto the new binary
// without failing a request, and workers dropped to another user.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// masterStatus is what the tests read of "gorolling status --json".
type masterStatus struct {
	PID            int    `json:"pid"`
	Version        string `json:"version"`
	ServiceStarted string `json:"service_started"`
	MasterUpgrades int    `json:"master_upgrades"`
	Generation     int    `json:"generation"`
	Upgrade        string `json:"upgrade"`
	Control        string `json:"control"`
	Processes      []struct {
		Generation int    `json:"generation"`
		PID        int    `json:"pid"`
		State      string `json:"state"`
	} `json:"processes"`
}

// workerPIDs returns the pids of the status's workers of generation gen.
func (s masterStatus) workerPIDs(gen int) []int {
	var pids []int
	for _, p := range s.Processes {
		if p.Generation == gen {
			pids = append(pids, p.PID)
		}
	}
	return pids
}

// installedStatus runs "/usr/bin/gorolling status --json --name NAME".
func installedStatus(name string) (masterStatus, error) {
	var st masterStatus
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binPath, "status", "--json", "--name", name)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return st, fmt.Errorf("%s status --json --name %s: %w: %s", binPath, name, err, strings.TrimSpace(stderr.String()))
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return st, fmt.Errorf("%s status --json: %w: %q", binPath, err, out)
	}
	return st, nil
}

// masterProc is a master started from the installed binary by a test, in
// a process group of its own, its output (and that of its workers and of
// the masters it re-execs) in a buffer that is logged when the test fails.
type masterProc struct {
	t       *testing.T
	name    string // --name: unique to the test
	server  string // the program: example-server, in this test run's own directory
	pid     int    // the master this test started
	out     syncBuffer
	outDone chan struct{} // closed once every process holding the output has exited
	waited  chan struct{} // closed once pid has been reaped
	waitErr error
	// madeRunDir: /run/gorolling did not exist before; cleanup removes it.
	madeRunDir bool
}

// startInstalledMaster runs "/usr/bin/gorolling exec --name NAME ARGS...".
// Whatever happens, the test's cleanup stops the master (SIGTERM to the
// live master, then SIGKILL) and kills what is left of the processes it
// started, each by pid.
func startInstalledMaster(t *testing.T, name, server string, args ...string) *masterProc {
	t.Helper()
	m := &masterProc{t: t, name: name, server: server, outDone: make(chan struct{}), waited: make(chan struct{})}
	if _, err := os.Stat(installedPaths.runDir); errors.Is(err, os.ErrNotExist) {
		m.madeRunDir = true
	}
	if _, err := os.Lstat(m.controlPath()); err == nil {
		t.Fatalf("%s exists already", m.controlPath())
	}
	// The output goes through a pipe of our own: os/exec's would make
	// Wait wait for the re-exec'd master and the workers too.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binPath, append([]string{"exec", "--name", name}, args...)...)
	cmd.Stdout, cmd.Stderr = w, w
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); k != "NOTIFY_SOCKET" && !strings.HasPrefix(k, "LISTEN_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	err = cmd.Start()
	w.Close()
	if err != nil {
		r.Close()
		t.Fatal(err)
	}
	m.pid = cmd.Process.Pid
	go func() {
		io.Copy(&m.out, r)
		r.Close()
		close(m.outDone)
	}()
	go func() {
		m.waitErr = cmd.Wait()
		close(m.waited)
	}()
	t.Cleanup(m.cleanup)
	return m
}

func (m *masterProc) controlPath() string {
	return filepath.Join(installedPaths.runDir, m.name+".sock")
}

func (m *masterProc) hasExited() bool {
	select {
	case <-m.waited:
		return true
	default:
		return false
	}
}

// waitExit waits up to d for the started master to exit and returns its
// exit error.
func (m *masterProc) waitExit(d time.Duration) (error, bool) {
	select {
	case <-m.waited:
		return m.waitErr, true
	case <-time.After(d):
		return nil, false
	}
}

// ours lists the live processes this master started: the masters running
// the installed binary with this test's --name, and every process running
// this test run's example-server.
func (m *masterProc) ours() []int {
	var pids []int
	for _, p := range liveProcesses() {
		if p.exe == m.server || p.exe == binPath && slices.Contains(p.argv, m.name) {
			pids = append(pids, p.pid)
		}
	}
	return pids
}

// cleanup stops whatever is left: SIGTERM to the live master (as status
// names it), to the one the test started and to any other master with the
// test's name, SIGKILL by pid to everything of ours still running after
// 30s, then it removes a control socket left behind.
func (m *masterProc) cleanup() {
	t := m.t
	var pids []int
	if st, err := installedStatus(m.name); err == nil && st.PID > 0 {
		pids = append(pids, st.PID)
	}
	if !m.hasExited() {
		pids = append(pids, m.pid)
	}
	for _, p := range liveProcesses() {
		if p.exe == binPath && slices.Contains(p.argv, m.name) && !slices.Contains(pids, p.pid) {
			pids = append(pids, p.pid)
		}
	}
	for _, p := range pids {
		syscall.Kill(p, syscall.SIGTERM)
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(m.ours()) > 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if left := m.ours(); len(left) > 0 {
		t.Errorf("cleanup: killing processes still running 30s after SIGTERM: %v", left)
		for _, p := range left {
			syscall.Kill(p, syscall.SIGKILL)
		}
	}
	if _, ok := m.waitExit(10 * time.Second); !ok {
		t.Errorf("cleanup: master %d was not reaped", m.pid)
	}
	select {
	case <-m.outDone:
	case <-time.After(5 * time.Second):
		t.Error("cleanup: the master's output is still open")
	}
	if t.Failed() {
		t.Logf("output of the master %s (pid %d) and what it started:\n%s", m.name, m.pid, m.out.String())
	}
	if _, err := os.Lstat(m.controlPath()); err == nil {
		os.Remove(m.controlPath())
	}
	if m.madeRunDir {
		os.Remove(installedPaths.runDir) // only if empty
	}
}

// proc is a live process: its pid, the file it runs and its arguments.
type proc struct {
	pid  int
	exe  string
	argv []string
}

// liveProcesses lists the processes whose executable can be read: not
// kernel threads, and not zombies (an exited master may be one for a
// while when pid 1 does not reap orphans).
func liveProcesses() []proc {
	ents, _ := os.ReadDir("/proc")
	var ps []proc
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		exe, err := os.Readlink("/proc/" + e.Name() + "/exe")
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		ps = append(ps, proc{
			pid:  pid,
			exe:  strings.TrimSuffix(exe, " (deleted)"),
			argv: strings.Split(strings.TrimSuffix(string(cmdline), "\x00"), "\x00"),
		})
	}
	return ps
}

// installedMasters lists the master processes of the installed binary:
// processes running /usr/bin/gorolling (or a since replaced file of that
// name) with "exec" in argv.
func installedMasters() []int {
	var pids []int
	for _, p := range liveProcesses() {
		if p.exe == binPath && slices.Contains(p.argv, "exec") {
			pids = append(pids, p.pid)
		}
	}
	return pids
}

// gone reports whether pid has exited (a zombie has).
func gone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// "PID (COMM) STATE ...": COMM may hold spaces and parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || strings.HasPrefix(s[i+1:], " Z") || strings.HasPrefix(s[i+1:], " X")
}

// waitGone waits up to d for pid to exit.
func waitGone(pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for !gone(pid) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// answer is what example-server says about the process that served a
// request.
type answer struct {
	pid, gen int
}

// getOnce makes one GET on a new connection.
func getOnce(addr string) (answer, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/")
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return answer{}, err
	}
	if resp.StatusCode != http.StatusOK {
		return answer{}, fmt.Errorf("%s: %q", resp.Status, body)
	}
	var a answer
	a.pid, _ = strconv.Atoi(resp.Header.Get("X-Pid"))
	a.gen, _ = strconv.Atoi(resp.Header.Get("X-Generation"))
	if a.pid <= 0 || a.gen <= 0 {
		return a, fmt.Errorf("no X-Pid or X-Generation in %v", resp.Header)
	}
	return a, nil
}

// waitServing waits until addr answers, failing the test if the master
// exits first.
func (m *masterProc) waitServing(addr string) answer {
	m.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		a, err := getOnce(addr)
		if err == nil {
			return a
		}
		if m.hasExited() {
			m.t.Fatalf("the master exited (%v) before serving on %s", m.waitErr, addr)
		}
		if time.Now().After(deadline) {
			m.t.Fatalf("no answer on %s within 30s: %v", addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stopLive sends SIGTERM to the live master pid and checks it drains and
// exits, taking its workers, its control socket and its port with it.
func (m *masterProc) stopLive(pid int, addr string) {
	t := m.t
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM to the master %d: %v", pid, err)
	}
	if !waitGone(pid, 30*time.Second) {
		t.Fatalf("the master %d still runs 30s after SIGTERM", pid)
	}
	if pid == m.pid {
		if err, _ := m.waitExit(5 * time.Second); err != nil {
			t.Errorf("the master exited with %v after SIGTERM, want status 0", err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(m.ours()) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if left := m.ours(); len(left) > 0 {
		t.Errorf("processes still running after the master exited: %v", left)
	}
	if _, err := os.Lstat(m.controlPath()); err == nil {
		t.Errorf("the master left its control socket %s behind", m.controlPath())
	}
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Errorf("%s still accepts connections after the master stopped", addr)
	}
}

// listenInodes returns the inodes of the IPv4 sockets listening on port:
// a socket handed from master to master keeps its inode.
func listenInodes(t *testing.T, port string) []string {
	t.Helper()
	p, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	suffix := fmt.Sprintf(":%04X", p)
	var inodes []string
	for _, l := range strings.Split(string(b), "\n")[1:] {
		// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
		f := strings.Fields(l)
		if len(f) >= 10 && strings.HasSuffix(f[1], suffix) && f[3] == "0A" {
			inodes = append(inodes, f[9])
		}
	}
	return inodes
}

// holdsSocket reports whether pid has the socket with that inode open.
func holdsSocket(pid int, inode string) bool {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil && l == "socket:["+inode+"]" {
			return true
		}
	}
	return false
}

// loader runs HTTP/1.1 POST clients that never retry: every dial, write
// or read error and every answer but 200 is a failed request.
type loader struct {
	addr      string
	keepAlive bool
	stop      chan struct{}
	wg        sync.WaitGroup

	mu       sync.Mutex
	ok       int
	failures []string
	byGen    map[int]int
}

// startLoad starts n clients. With keepAlive a client reuses its
// connection until an answer says "Connection: close"; without, every
// request opens a new connection.
func startLoad(t *testing.T, addr string, n int, keepAlive bool) *loader {
	l := &loader{addr: addr, keepAlive: keepAlive, stop: make(chan struct{}), byGen: map[int]int{}}
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
	body := "gorolling packaging test"
	req := "POST / HTTP/1.1\r\nHost: gorolling-packaging-test\r\nContent-Type: text/plain\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n"
	if !l.keepAlive {
		req += "Connection: close\r\n"
	}
	req += "\r\n" + body
	var conn net.Conn
	var br *bufio.Reader
	lastPid := 0
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
				l.fail("dial: %v", err)
				time.Sleep(5 * time.Millisecond)
				continue
			}
			conn, br = c, bufio.NewReader(c)
		}
		conn.SetDeadline(time.Now().Add(15 * time.Second))
		if _, err := io.WriteString(conn, req); err != nil {
			l.fail("write (previous answer on this connection from pid %d): %v", lastPid, err)
			drop()
			continue
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			l.fail("read (previous answer on this connection from pid %d): %v", lastPid, err)
			drop()
			continue
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			l.fail("answer %s, body error %v", resp.Status, err)
			drop()
			continue
		}
		pid, _ := strconv.Atoi(resp.Header.Get("X-Pid"))
		gen, _ := strconv.Atoi(resp.Header.Get("X-Generation"))
		l.mu.Lock()
		l.ok++
		l.byGen[gen]++
		l.mu.Unlock()
		lastPid = pid
		if !l.keepAlive || resp.Close {
			drop()
		}
	}
}

func (l *loader) fail(format string, args ...any) {
	l.mu.Lock()
	l.failures = append(l.failures, fmt.Sprintf(format, args...))
	l.mu.Unlock()
}

func (l *loader) succeeded() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ok
}

// finish stops the clients and fails the test if any request failed or
// none was served by generation gen.
func (l *loader) finish(t *testing.T, what string, gen int) {
	t.Helper()
	l.halt()
	l.mu.Lock()
	defer l.mu.Unlock()
	t.Logf("%s: %d requests ok, %d failed; ok by generation %v", what, l.ok, len(l.failures), l.byGen)
	for i, f := range l.failures {
		if i == 10 {
			t.Errorf("... and %d more", len(l.failures)-10)
			break
		}
		t.Errorf("%s: failed request: %s", what, f)
	}
	if len(l.failures) > 0 {
		t.Errorf("%s: %d of %d requests failed", what, len(l.failures), l.ok+len(l.failures))
	}
	if l.byGen[gen] == 0 {
		t.Errorf("%s: no request was served by generation %d", what, gen)
	}
}

// TestDebUpgradeUnderLoad installs version A, runs a master from
// /usr/bin/gorolling over example-server, and installs version B over A
// while clients that never retry keep it busy. The postinst must re-exec
// the running master onto the new binary (gorolling upgrade --master
// --wait for each /run/gorolling/*.sock): no request fails, the package
// operation succeeds, the new master reports version B and one master
// upgrade, the old master exits, exactly one master remains, and nothing
// was stopped or restarted (the same listening socket, the service start
// time kept, the generation one higher).
func TestDebUpgradeUnderLoad(t *testing.T) {
	claimDpkg(t)
	debA, _ := buildFor(t, versionA)
	debB, _ := buildFor(t, versionB)
	server := exampleServer(t)
	if ms := installedMasters(); len(ms) > 0 {
		t.Fatalf("masters of %s already run: %v", binPath, ms)
	}
	mustCommand(t, "dpkg", "-i", debA)

	name := fmt.Sprintf("pkgtest-load-%d", os.Getpid())
	port := freePort(t)
	addr := "127.0.0.1:" + port
	m := startInstalledMaster(t, name, server, "-w", "2", "--", server, "-listen", addr)
	m.waitServing(addr)
	before, err := installedStatus(name)
	if err != nil {
		t.Fatal(err)
	}
	if before.PID != m.pid || before.Version != versionA || before.Generation != 1 || before.MasterUpgrades != 0 || before.Control != m.controlPath() {
		t.Fatalf("status of the master %d from %s %s: %+v", m.pid, binPath, versionA, before)
	}
	if fi, err := os.Lstat(m.controlPath()); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("no control socket %s: %v", m.controlPath(), err)
	}
	// One socket per worker slot (--spread even, the default: a reuseport
	// group), every one held by the master.
	inodes := listenInodes(t, port)
	slices.Sort(inodes)
	if len(inodes) != 2 || !holdsSocket(m.pid, inodes[0]) || !holdsSocket(m.pid, inodes[1]) {
		t.Fatalf("sockets listening on %s: %v; want two (one per slot), the master's", addr, inodes)
	}
	oldWorkers := before.workerPIDs(1)
	if len(oldWorkers) != 2 {
		t.Fatalf("workers of generation 1: %v, want 2", oldWorkers)
	}

	keepAlive := startLoad(t, addr, 8, true)
	newConn := startLoad(t, addr, 8, false)
	time.Sleep(500 * time.Millisecond)
	if keepAlive.succeeded() == 0 || newConn.succeeded() == 0 {
		t.Fatal("the load does not get answers")
	}

	start := time.Now()
	out, err := command("dpkg", "-i", debB)
	t.Logf("dpkg -i %s under load took %v", filepath.Base(debB), time.Since(start).Round(time.Millisecond))
	if err != nil {
		t.Fatalf("upgrading the package under load: %v", err)
	}
	if !strings.Contains(out, "re-executing the master behind "+m.controlPath()) {
		t.Errorf("the postinst did not re-exec the master behind %s:\n%s", m.controlPath(), out)
	}
	if strings.Contains(out, "was not upgraded") {
		t.Errorf("the postinst could not upgrade the master:\n%s", out)
	}
	if got := mustCommand(t, "dpkg-query", "-W", "-f=${Version}", "gorolling"); got != pkgVersion(versionB) {
		t.Errorf("installed version %q, want %q", got, pkgVersion(versionB))
	}

	// upgrade --master --wait returned: the new master serves. The old
	// one drains its workers and exits.
	after, err := installedStatus(name)
	if err != nil {
		t.Fatal(err)
	}
	if after.PID == before.PID {
		keepAlive.finish(t, "keep-alive clients", before.Generation)
		newConn.finish(t, "new-connection clients", before.Generation)
		t.Fatalf("the live master is still pid %d, version %q, %d master upgrades, generation %d: the package upgrade did not re-exec it",
			after.PID, after.Version, after.MasterUpgrades, after.Generation)
	}
	exitErr, exited := m.waitExit(60 * time.Second)
	if !exited {
		t.Fatalf("the old master %d still runs 60s after the package upgrade", m.pid)
	}
	if exitErr != nil {
		t.Errorf("the old master exited with %v, want status 0", exitErr)
	}
	time.Sleep(500 * time.Millisecond)
	keepAlive.finish(t, "keep-alive clients", before.Generation+1)
	newConn.finish(t, "new-connection clients", before.Generation+1)

	printed := strings.TrimSpace(mustCommand(t, binPath, "version"))
	if printed != "gorolling "+versionB {
		t.Errorf("%s version printed %q after the upgrade, want %q", binPath, printed, "gorolling "+versionB)
	}
	if after.Version != versionB || "gorolling "+after.Version != printed {
		t.Errorf("the live master reports version %q; want %q, the version of the binary installed (%q)", after.Version, versionB, printed)
	}
	if after.MasterUpgrades != 1 {
		t.Errorf("the live master reports %d master upgrades, want 1", after.MasterUpgrades)
	}
	// Not stopped, restarted or reloaded: exactly one new generation, the
	// one the new master started, and the same service.
	if after.Generation != before.Generation+1 {
		t.Errorf("generation %d serves after the package upgrade; want %d, one master upgrade after %d", after.Generation, before.Generation+1, before.Generation)
	}
	if after.ServiceStarted != before.ServiceStarted {
		t.Errorf("service_started changed from %s to %s: the service was restarted", before.ServiceStarted, after.ServiceStarted)
	}
	if after.Upgrade != "" {
		t.Errorf("an upgrade is still in progress: %q", after.Upgrade)
	}
	got := listenInodes(t, port)
	slices.Sort(got)
	if !slices.Equal(got, inodes) || !holdsSocket(after.PID, inodes[0]) || !holdsSocket(after.PID, inodes[1]) {
		t.Errorf("sockets listening on %s: %v, before the upgrade %v: want the same sockets, held by the new master %d", addr, got, inodes, after.PID)
	}
	if ms := installedMasters(); !slices.Equal(ms, []int{after.PID}) {
		t.Errorf("masters running %s: %v; want only the new one, %d", binPath, ms, after.PID)
	}
	newWorkers := after.workerPIDs(after.Generation)
	if len(newWorkers) != 2 || len(after.Processes) != 2 {
		t.Errorf("workers after the upgrade: %+v; want 2, all of generation %d", after.Processes, after.Generation)
	}
	for _, w := range oldWorkers {
		if !waitGone(w, 10*time.Second) {
			t.Errorf("worker %d of generation 1 still runs", w)
		}
	}
	if a, err := getOnce(addr); err != nil {
		t.Error(err)
	} else if a.gen != after.Generation || !slices.Contains(newWorkers, a.pid) {
		t.Errorf("served by pid %d of generation %d; want one of %v, generation %d", a.pid, a.gen, newWorkers, after.Generation)
	}
	if t.Failed() {
		t.FailNow()
	}

	m.stopLive(after.PID, addr)
}

// privilegedPort returns 80 if it is free on 127.0.0.1, else a free port
// below 1024.
func privilegedPort(t *testing.T) string {
	t.Helper()
	for p := 1024; p >= 512; p-- {
		port := p
		if p == 1024 {
			port = 80
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err == nil {
			l.Close()
			return strconv.Itoa(port)
		}
	}
	t.Fatal("no free port below 1024 on 127.0.0.1")
	return ""
}

// procIDs reads the Uid, Gid and Groups lines of /proc/PID/status: the
// real, effective, saved and filesystem ids, and the supplementary groups.
func procIDs(pid int) (uids, gids, groups []string, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, nil, nil, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "Uid:":
			uids = f[1:]
		case "Gid:":
			gids = f[1:]
		case "Groups:":
			groups = f[1:]
		}
	}
	return uids, gids, groups, nil
}

// TestDebPrivilegeDrop runs the installed binary as root with --user
// nobody and a pre-opened privileged port: the workers that answer run as
// nobody (uid 65534 on Debian), the master as root.
func TestDebPrivilegeDrop(t *testing.T) {
	claimDpkg(t)
	nobody, err := user.Lookup("nobody")
	if err != nil {
		if ciMode() {
			t.Fatalf("no user nobody (%v) and GOROLLING_CI is set", err)
		}
		t.Skipf("skipping: no user nobody: %v", err)
	}
	wantGroups, err := nobody.GroupIds()
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(wantGroups)
	debA, _ := buildFor(t, versionA)
	server := exampleServer(t)
	mustCommand(t, "dpkg", "-i", debA)

	name := fmt.Sprintf("pkgtest-privdrop-%d", os.Getpid())
	port := privilegedPort(t)
	addr := "127.0.0.1:" + port
	if port != "80" {
		t.Logf("port 80 is busy: using port %s", port)
	}
	m := startInstalledMaster(t, name, server, "--user", "nobody", "--listen", "tcp://"+addr, "-w", "2", "--", server, "-listen", addr)
	a := m.waitServing(addr)
	st, err := installedStatus(name)
	if err != nil {
		t.Fatal(err)
	}
	workers := st.workerPIDs(st.Generation)
	if st.PID != m.pid || len(workers) != 2 || !slices.Contains(workers, a.pid) {
		t.Fatalf("%s was served by pid %d; the master %d reports %+v", addr, a.pid, m.pid, st)
	}
	// The worker that answered is one of them.
	for _, pid := range workers {
		uids, gids, groups, err := procIDs(pid)
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(groups)
		if !slices.Equal(uids, slices.Repeat([]string{nobody.Uid}, 4)) || !slices.Equal(gids, slices.Repeat([]string{nobody.Gid}, 4)) || !slices.Equal(groups, wantGroups) {
			t.Errorf("worker %d runs as uids %v gids %v groups %v; want nobody: uid %s gid %s groups %v", pid, uids, gids, groups, nobody.Uid, nobody.Gid, wantGroups)
		}
	}
	if nobody.Uid != "65534" {
		t.Logf("nobody is uid %s here", nobody.Uid)
	}
	if uids, _, _, err := procIDs(m.pid); err != nil {
		t.Fatal(err)
	} else if uids[0] != "0" || uids[1] != "0" {
		t.Errorf("the master runs as uids %v, want root", uids)
	}
	if t.Failed() {
		t.FailNow()
	}
	m.stopLive(m.pid, addr)
}
