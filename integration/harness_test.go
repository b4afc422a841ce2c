package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
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

	"github.com/gorolling/gorolling/master/control"
	"github.com/gorolling/gorolling/master/events"
	"github.com/gorolling/gorolling/master/procfs"
	"golang.org/x/sys/unix"
)

// bin holds the binaries TestMain builds: gorolling, example-server,
// testworker, fakesystemd (a service manager with systemd's fd store,
// restart and watchdog) and gorolling-debug (gorolling with the
// gorolling_debug test hooks).
var bin string

// buildFlags are extra flags for building them (-race under -race).
var buildFlags []string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "gorolling-it-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = dir
	os.Chmod(dir, 0o755) // other users (nobody) run the binaries in some tests
	args := append([]string{"build", "-o", dir + "/"}, buildFlags...)
	build := exec.Command("go", append(args, "../cmd/gorolling", "../cmd/example-server", "./testworker", "./fakesystemd", "./examples/chat")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	err = build.Run()
	if err == nil {
		// The watchdog test's master, which can be stalled on purpose.
		debug := exec.Command("go", append(append([]string{"build", "-tags", "gorolling_debug", "-o", filepath.Join(dir, "gorolling-debug")}, buildFlags...), "../cmd/gorolling")...)
		debug.Stdout, debug.Stderr = os.Stderr, os.Stderr
		err = debug.Run()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "build:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func binPath(name string) string { return filepath.Join(bin, name) }

// entry is one JSON log line of the master.
type entry map[string]any

func (e entry) event() string { s, _ := e["event"].(string); return s }
func (e entry) level() string { s, _ := e["@level"].(string); return s }
func (e entry) str(k string) string {
	switch v := e[k].(type) {
	case string:
		return v
	case nil:
		return ""
	default:
		return fmt.Sprint(v)
	}
}
func (e entry) num(k string) int {
	switch v := e[k].(type) {
	case float64:
		return int(v)
	case string:
		n, _ := strconv.Atoi(v)
		return n
	}
	return -1
}

// proc is a gorolling master started by a test.
type proc struct {
	t     *testing.T
	cmd   *exec.Cmd
	pid   int
	mu    sync.Mutex
	logs  []entry
	lines []string
	// started are the workers the master logged as online, with their
	// start times (under mu).
	started []startedProc
	stdout  bytes.Buffer
	wake    chan struct{}
	done    chan struct{}
	state   *os.ProcessState
	pidNS   bool
}

type masterOpts struct {
	bin  string   // the gorolling binary to run (default: the one built)
	wrap []string // a command that runs gorolling (systemd-socket-activate, fakesystemd, unshare ...)
	// pidNS: wrap starts gorolling in a new pid namespace, where the pids
	// it logs mean other processes than outside.
	pidNS bool
	args  []string // gorolling arguments after "exec"
	dir   string
	env   []string
	files []*os.File // become fds 3, 4, ...
	// tty, if set, is a terminal the master gets as its stdin, its stdout
	// and its session's controlling terminal, as when an operator starts
	// it from a shell.
	tty *os.File
}

// startMaster runs "gorolling exec --log-format json --log-level debug ARGS".
// Cleanup stops it (and, if it misbehaved, the workers it logged) by pid.
func startMaster(t *testing.T, o masterOpts) *proc {
	t.Helper()
	flags := []string{"exec", "--log-format", "json", "--log-level", "debug"}
	if !slices.Contains(o.args, "--control") && !slices.Contains(o.args, "--name") {
		// Tests run many masters of the same program: give each its own.
		flags = append(flags, "--control", privateControl(t))
	}
	gr := o.bin
	if gr == "" {
		gr = binPath("gorolling")
	}
	args := append(append([]string{gr}, flags...), o.args...)
	args = append(append([]string{}, o.wrap...), args...)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = o.dir
	cmd.Env = append(os.Environ(), o.env...)
	cmd.ExtraFiles = o.files
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	p := &proc{t: t, cmd: cmd, wake: make(chan struct{}), done: make(chan struct{}), pidNS: o.pidNS}
	cmd.Stdout = &lockedWriter{mu: &p.mu, w: &p.stdout}
	if o.tty != nil {
		cmd.Stdin, cmd.Stdout = o.tty, o.tty
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.pid = cmd.Process.Pid
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			var e entry
			p.mu.Lock()
			p.lines = append(p.lines, line)
			if json.Unmarshal([]byte(line), &e) == nil {
				p.logs = append(p.logs, e)
				if e.event() == events.WorkerOnline {
					// Which process it is, read while it surely runs: the
					// leak check below then needs no guess from its binary
					// (Python and Node workers run no binary of ours).
					if st, err := procfs.ReadStat(e.num("pid")); err == nil {
						p.started = append(p.started, startedProc{pid: e.num("pid"), start: st.Start})
					}
				}
			}
			close(p.wake)
			p.wake = make(chan struct{})
			p.mu.Unlock()
		}
	}()
	go func() {
		<-readDone
		cmd.Wait()
		p.mu.Lock()
		p.state = cmd.ProcessState
		close(p.wake)
		p.wake = make(chan struct{})
		p.mu.Unlock()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.cleanup()
		if t.Failed() {
			p.dump()
		}
	})
	return p
}

// privateControl returns a control socket path in a directory the master
// creates (mode 0700), as it requires.
func privateControl(t *testing.T) string {
	return filepath.Join(t.TempDir(), "ctl", "control.sock")
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func (p *proc) dump() {
	p.mu.Lock()
	defer p.mu.Unlock()
	lines := p.lines
	if len(lines) > 300 {
		lines = lines[len(lines)-300:]
	}
	p.t.Logf("master log (last %d lines):\n%s", len(lines), strings.Join(lines, "\n"))
	if p.stdout.Len() > 0 {
		out := p.stdout.String()
		if len(out) > 4000 {
			out = out[len(out)-4000:]
		}
		p.t.Logf("workers' stdout:\n%s", out)
	}
}

// cleanup stops the master if it still runs, then kills any worker it
// started that survived (only pids the master logged, and only if they
// still run one of our binaries).
func (p *proc) cleanup() {
	// Masters that replaced the first one (self-upgrades) are not our
	// children: stop them by the pids they logged.
	masters := []int{p.pid}
	if p.pidNS {
		// Its pids are not ours to signal; ending pid 1 (unshare's child,
		// which unshare's SIGTERM reaches or whose namespace dies with it)
		// ends every process in the namespace.
		p.stopWrapper()
		return
	}
	for _, e := range p.entries() {
		if e.event() == events.MasterStarting {
			if pid := e.num("pid"); pid != p.pid && alive(pid) && ours(pid) {
				masters = append(masters, pid)
				syscall.Kill(pid, syscall.SIGTERM)
			}
		}
	}
	select {
	case <-p.done:
	default:
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			p.t.Errorf("master %d still running 15s after SIGTERM; killing it", p.pid)
			p.cmd.Process.Kill()
			// A wrapper's masters hold its output too: they must go for
			// the output to end.
			for _, pid := range masters[1:] {
				if alive(pid) && ours(pid) {
					syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			select {
			case <-p.done:
			case <-time.After(45 * time.Second): // the workers' drain timeout
				p.t.Errorf("the output of master %d is still open 45s after it was killed", p.pid)
			}
		}
	}
	for _, pid := range masters[1:] {
		for end := time.Now().Add(15 * time.Second); alive(pid) && ours(pid); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(end) {
				p.t.Errorf("master %d still running 15s after SIGTERM; killing it", pid)
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	// A master that stopped has reaped its workers: one still running is a
	// leak the test must report, not hide. Workers of a master that was
	// killed (a test's kill -9) drain by themselves; they get their drain
	// timeout's worth of time.
	p.mu.Lock()
	started := append([]startedProc(nil), p.started...)
	p.mu.Unlock()
	for _, w := range started {
		for end := time.Now().Add(35 * time.Second); w.running(); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(end) {
				p.t.Errorf("worker %d outlived its master; killing it", w.pid)
				syscall.Kill(w.pid, syscall.SIGKILL)
				break
			}
		}
	}
}

// startedProc is one process a master started: its pid and its start
// time, which tell it from a later process that got the same pid.
type startedProc struct {
	pid   int
	start uint64
}

// running reports whether that very process still runs (a zombie does
// not).
func (s startedProc) running() bool {
	st, err := procfs.ReadStat(s.pid)
	return err == nil && st.State != 'Z' && st.Start == s.start
}

// stopWrapper ends the master's wrapper process and what runs under it:
// SIGTERM to the wrapper's children, then the wrapper.
func (p *proc) stopWrapper() {
	select {
	case <-p.done:
		return
	default:
	}
	for _, c := range children(p.pid) {
		syscall.Kill(c, syscall.SIGTERM)
	}
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		p.t.Errorf("wrapper %d still running 15s after SIGTERM to its child; killing it", p.pid)
		for _, c := range children(p.pid) {
			syscall.Kill(c, syscall.SIGKILL)
		}
		p.cmd.Process.Kill()
		<-p.done
	}
}

// ours reports whether pid is alive and runs a binary from our build dir
// or a test's temp dir.
func ours(pid int) bool {
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		return false
	}
	return strings.HasPrefix(exe, bin) || strings.HasPrefix(exe, os.TempDir())
}

func (p *proc) entries() []entry {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]entry(nil), p.logs...)
}

// waitLog waits until some log entry at index >= from satisfies pred and
// returns it with its index.
func (p *proc) waitLog(timeout time.Duration, from int, what string, pred func(entry) bool) (entry, int) {
	p.t.Helper()
	deadline := time.After(timeout)
	i := from
	for {
		p.mu.Lock()
		for ; i < len(p.logs); i++ {
			if pred(p.logs[i]) {
				e := p.logs[i]
				p.mu.Unlock()
				return e, i
			}
		}
		wake := p.wake
		exited := p.state != nil
		p.mu.Unlock()
		if exited {
			p.t.Fatalf("master exited while waiting for %s", what)
		}
		select {
		case <-wake:
		case <-deadline:
			p.t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
	}
}

// isEvent matches log lines of one event (master/events): tests never
// depend on a message's wording.
func isEvent(ev string) func(entry) bool { return func(e entry) bool { return e.event() == ev } }

func (p *proc) count(pred func(entry) bool) int {
	n := 0
	for _, e := range p.entries() {
		if pred(e) {
			n++
		}
	}
	return n
}

// waitServing waits for the first generation to serve.
func (p *proc) waitServing() {
	p.t.Helper()
	p.waitLog(30*time.Second, 0, "the first generation to serve", isEvent(events.GenerationServing))
}

// workerPIDs returns the pids of every worker the master started in gen.
func (p *proc) workerPIDs(gen int) []int {
	var out []int
	for _, e := range p.entries() {
		if e.event() == events.WorkerOnline && e.num("generation") == gen {
			out = append(out, e.num("pid"))
		}
	}
	return out
}

func (p *proc) allWorkerPIDs() []int {
	var out []int
	for _, e := range p.entries() {
		if e.event() == events.WorkerOnline {
			out = append(out, e.num("pid"))
		}
	}
	return out
}

// listenAddr returns the address of the first socket the master handed out
// for key (as logged at debug level).
func (p *proc) listenAddr(timeout time.Duration) string {
	p.t.Helper()
	e, _ := p.waitLog(timeout, 0, "a listener", isEvent(events.ListenerHandedOver))
	return e.str("addr")
}

func (p *proc) signal(sig syscall.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("signal master: %v", err)
	}
}

// upgrade sends SIGHUP and waits for the upgrade to finish; it returns the
// new generation.
func (p *proc) upgrade(timeout time.Duration) int {
	p.t.Helper()
	from := len(p.entries())
	p.signal(syscall.SIGHUP)
	e, _ := p.waitLog(timeout, from, "an upgrade to finish", func(e entry) bool {
		return e.event() == events.UpgradeFinished || e.event() == events.UpgradeRolledBack
	})
	if e.event() != events.UpgradeFinished {
		p.t.Fatalf("upgrade rolled back: %s", e.str("reason"))
	}
	return e.num("generation")
}

// wait waits for the master to exit and returns its exit code.
func (p *proc) wait(timeout time.Duration) int {
	p.t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.t.Fatalf("master still running after %s", timeout)
	}
	return p.state.ExitCode()
}

// fdCount returns how many descriptors pid has open.
func fdCount(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// fdKinds summarises pid's descriptors by kind (what their links name,
// without inode numbers), for messages about descriptor counts.
func fdKinds(t *testing.T, pid int) map[string]int {
	t.Helper()
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	out := map[string]int{}
	for _, e := range ents {
		l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
		if i := strings.IndexByte(l, '['); i > 0 {
			l = l[:i]
		}
		out[l]++
	}
	return out
}

// blockingSockets lists pid's socket descriptors that lack O_NONBLOCK.
func blockingSockets(t *testing.T, pid int) []int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, e := range ents {
		link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
		if err != nil || !strings.HasPrefix(link, "socket:") {
			continue
		}
		info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, e.Name()))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				flags, _ := strconv.ParseInt(strings.TrimSpace(v), 8, 64)
				if flags&syscall.O_NONBLOCK == 0 {
					n, _ := strconv.Atoi(e.Name())
					out = append(out, n)
				}
			}
		}
	}
	return out
}

func alive(pid int) bool {
	return procfs.Running(pid) // a zombie is not alive for our purposes
}

// children returns the pids whose parent is pid.
func children(pid int) []int { return procfs.Children(pid) }

// twReport is one line of a testworker report.
type twReport struct {
	PID   int    `json:"pid"`
	Slot  int    `json:"slot"`
	ID    int    `json:"id"`
	Gen   int    `json:"gen"`
	Op    string `json:"op"`
	Arg   string `json:"arg"`
	Addr  string `json:"addr"`
	Err   string `json:"err"`
	Errno string `json:"errno"`
	FDs   []int  `json:"fds"`
	Env   string `json:"env"`
	OK    int    `json:"ok"`
}

func readReports(t *testing.T, path string) []twReport {
	t.Helper()
	return readJSONL[twReport](t, path)
}

// readJSONL reads a file of one JSON object per line (a missing file is
// empty).
func readJSONL[T any](t *testing.T, path string) []T {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []T
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" {
			continue
		}
		var r T
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("bad report line %q: %v", line, err)
		}
		out = append(out, r)
	}
	return out
}

// waitReports waits until pred holds for the reports so far.
func waitReports(t *testing.T, path string, timeout time.Duration, what string, pred func([]twReport) bool) []twReport {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		rs := readReports(t, path)
		if pred(rs) {
			return rs
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; reports: %+v", what, rs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func opsOf(rs []twReport, op string, gen int) []twReport {
	var out []twReport
	for _, r := range rs {
		if r.Op == op && (gen == 0 || r.Gen == gen) {
			out = append(out, r)
		}
	}
	return out
}

// requireTool returns the path of an external program a test needs. It
// skips the test when the program is missing, unless GOROLLING_CI is set:
// CI installs every tool, so there a missing one is a failure.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("GOROLLING_CI") != "" {
			t.Fatalf("%s is not installed, and GOROLLING_CI is set: .ci/run must install it", name)
		}
		t.Skipf("%s is not installed (CI installs it; see .ci/run)", name)
	}
	return p
}

// freePort returns a port that was free a moment ago on 127.0.0.1, for
// tools that need a fixed port on their command line.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// controlArg returns the --control path startMaster chose (or the one in
// the args).
func (p *proc) controlPath() string {
	args := p.cmd.Args
	for i, a := range args {
		if a == "--control" && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

// gorolling runs a gorolling client command and returns its exit code,
// stdout and stderr.
func gorolling(t *testing.T, cred *syscall.Credential, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(binPath("gorolling"), args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		cmd.Process.Kill()
		<-done
		t.Fatalf("gorolling %v did not finish", args)
	}
	return cmd.ProcessState.ExitCode(), out.String(), errb.String()
}

// statusLatency asks the master at ctl for its status over the control
// socket, in this process (a CLI process's own start-up would dominate the
// figure), and returns how long the answer took.
func statusLatency(t *testing.T, ctl string) time.Duration {
	t.Helper()
	start := time.Now()
	c, err := net.DialTimeout("unix", ctl, 10*time.Second)
	if err != nil {
		t.Fatalf("connect to %s: %v", ctl, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(`{"cmd":"status"}` + "\n")); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	var resp struct {
		OK    bool   `json:"ok"`
		Error string `json:"error"`
	}
	if json.Unmarshal(line, &resp) != nil || !resp.OK {
		t.Fatalf("status answered %q", line)
	}
	return time.Since(start)
}

// readPID reads a pid file.
func readPID(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

// pyReport is the start report of examples/python/server.py.
type pyReport struct {
	PID       int               `json:"pid"`
	FDs       []int             `json:"fds"`
	Env       map[string]string `json:"env"`
	Activated []int             `json:"activated"`
}

func readPyReports(t *testing.T, path string) []pyReport {
	t.Helper()
	return readJSONL[pyReport](t, path)
}

func examplePath(t *testing.T, rel string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("examples", rel))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// loadWithUpgrades runs the non-retrying load loop in each connection mode
// while the master is upgraded n times, and requires zero failures.
func loadWithUpgrades(t *testing.T, p *proc, addr string, n int) {
	t.Helper()
	for _, keepAlive := range []bool{true, false} {
		before := p.count(isEvent(events.UpgradeFinished))
		l := startLoad(t, addr, 32, keepAlive)
		time.Sleep(300 * time.Millisecond)
		for i := 0; i < n; i++ {
			p.upgrade(60 * time.Second)
			time.Sleep(300 * time.Millisecond)
		}
		l.requireNoFailures(t)
		if got := p.count(isEvent(events.UpgradeFinished)) - before; got != n {
			t.Fatalf("%d upgrades finished, want %d", got, n)
		}
	}
}

// startProcess starts a helper process in its own process group; cleanup
// sends it SIGTERM, then SIGKILL, by pid.
func startProcess(t *testing.T, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	return cmd
}

// poke connects to addr as soon as something listens there (within 10 s):
// systemd-socket-activate starts its program on the first connection.
func poke(addr string) {
	for i := 0; i < 500; i++ {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitHTTP waits until addr answers an HTTP request.
func waitHTTP(t *testing.T, addr string, timeout time.Duration) {
	t.Helper()
	c := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(timeout)
	for {
		resp, err := c.Get("http://" + addr + "/")
		if err == nil {
			resp.Body.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not answer within %s: %v", addr, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// twMaster starts a master running testworker with script, reporting to a
// fresh file. It waits for the first generation to serve.
func twMaster(t *testing.T, workers int, script string, o masterOpts) (*proc, string) {
	t.Helper()
	report := filepath.Join(t.TempDir(), "report.jsonl")
	o.args = append([]string{"-w", strconv.Itoa(workers)}, append(o.args, "--", binPath("testworker"))...)
	o.env = append(o.env, "TW_SCRIPT="+script, "TW_REPORT="+report)
	p := startMaster(t, o)
	p.waitServing()
	return p, report
}

// listens returns the reports of op in generation gen, grouped by pid.
func listensByPID(rs []twReport, op string, gen int) map[int][]twReport {
	out := map[int][]twReport{}
	for _, r := range opsOf(rs, op, gen) {
		out[r.PID] = append(out[r.PID], r)
	}
	return out
}

// rawSocket makes a socket on 127.0.0.1 with a kernel-chosen port, bound
// and optionally listening, without the net package (so no Fd() games).
func rawSocket(t *testing.T, typ int, listen bool) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if listen {
		if err := unix.Listen(fd, 128); err != nil {
			t.Fatal(err)
		}
	}
	return fd
}

func sockName(t *testing.T, fd int) string {
	t.Helper()
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	a := sa.(*unix.SockaddrInet4)
	return net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
}

func udpAsk(t *testing.T, addr, msg string) string {
	t.Helper()
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 512)
	for i := 0; i < 5; i++ {
		c.Write([]byte(msg))
		c.SetReadDeadline(time.Now().Add(time.Second))
		if n, err := c.Read(buf); err == nil {
			return string(buf[:n])
		}
	}
	t.Fatalf("no answer from %s", addr)
	return ""
}

// failure is one failed request.
type failure struct {
	err string
	// lastPid is the worker that served the previous request on the same
	// connection (0 for a connection's first request).
	lastPid int
}

// slowRequest bounds one request of the load loop: slower counts as failed.
const slowRequest = 2 * time.Second

// loader runs a load loop of HTTP/1.1 POSTs from clients that never retry:
// every dial error, write error, read error, non-200 answer or answer
// slower than slowRequest counts as a failed request.
type loader struct {
	addr      string
	keepAlive bool
	path      string
	stop      chan struct{}
	wg        sync.WaitGroup

	mu       sync.Mutex
	ok       int
	failures []failure
	byGen    map[int]int
	byPid    map[int]int
	slowest  time.Duration // the slowest answered request
}

// startLoad starts n clients against addr. With keepAlive each client
// reuses its connection until the server says "Connection: close";
// without, every request opens a new connection.
func startLoad(t *testing.T, addr string, n int, keepAlive bool) *loader {
	l := &loader{addr: addr, keepAlive: keepAlive, path: "/", stop: make(chan struct{}), byGen: map[int]int{}, byPid: map[int]int{}}
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
	var conn net.Conn
	var br *bufio.Reader
	lastPid := 0
	body := "hello"
	req := "POST " + l.path + " HTTP/1.1\r\nHost: gorolling-test\r\nContent-Type: text/plain\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n"
	if !l.keepAlive {
		req += "Connection: close\r\n"
	}
	req += "\r\n" + body
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
				l.fail(failure{err: "dial: " + err.Error()})
				time.Sleep(5 * time.Millisecond)
				continue
			}
			conn, br = c, bufio.NewReader(c)
		}
		conn.SetDeadline(time.Now().Add(15 * time.Second))
		sent := time.Now()
		if _, err := io.WriteString(conn, req); err != nil {
			l.fail(failure{err: "write: " + err.Error(), lastPid: lastPid})
			drop()
			continue
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			l.fail(failure{err: "read: " + err.Error(), lastPid: lastPid})
			drop()
			continue
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			l.fail(failure{err: fmt.Sprintf("status %d, body error %v", resp.StatusCode, err), lastPid: lastPid})
			drop()
			continue
		}
		pid, _ := strconv.Atoi(resp.Header.Get("X-Pid"))
		gen, _ := strconv.Atoi(resp.Header.Get("X-Generation"))
		slow := time.Since(sent) > slowRequest
		if slow {
			// An upgrade must not stall clients either.
			l.fail(failure{err: fmt.Sprintf("answered after %s (the bound is %s)", time.Since(sent).Round(time.Millisecond), slowRequest), lastPid: lastPid})
		}
		l.mu.Lock()
		if !slow {
			l.ok++
		}
		l.slowest = max(l.slowest, time.Since(sent))
		l.byGen[gen]++
		l.byPid[pid]++
		l.mu.Unlock()
		lastPid = pid
		if !l.keepAlive || resp.Close {
			drop()
		}
	}
}

func (l *loader) fail(f failure) {
	l.mu.Lock()
	l.failures = append(l.failures, f)
	l.mu.Unlock()
}

func (l *loader) counts() (ok int, failed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ok, len(l.failures)
}

// report stops the load and fails the test if any request failed.
func (l *loader) requireNoFailures(t *testing.T) {
	t.Helper()
	l.halt()
	l.mu.Lock()
	defer l.mu.Unlock()
	t.Logf("load: %d requests ok, %d failed; by generation %v", l.ok, len(l.failures), l.byGen)
	if l.ok == 0 {
		t.Fatal("no request succeeded")
	}
	if len(l.failures) > 0 {
		for i, f := range l.failures {
			if i == 10 {
				break
			}
			t.Errorf("failed request (previous pid on the connection %d): %s", f.lastPid, f.err)
		}
		t.Fatalf("%d of %d requests failed", len(l.failures), l.ok+len(l.failures))
	}
}

// get does one request on a new connection and returns the serving pid and
// generation.
func get(t *testing.T, addr string) (pid, gen int) {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/")
	if err != nil {
		t.Fatalf("GET %s: %v", addr, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	pid, _ = strconv.Atoi(resp.Header.Get("X-Pid"))
	gen, _ = strconv.Atoi(resp.Header.Get("X-Generation"))
	return pid, gen
}

// privilegedPort finds a free port below 1024 on 127.0.0.1.
func privilegedPort(t *testing.T, skip int) int {
	t.Helper()
	for p := 700; p < 1024; p++ {
		if p == skip {
			continue
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err == nil {
			l.Close()
			return p
		}
	}
	t.Fatal("no free port below 1024")
	return 0
}

// procIDs reads the Uid, Gid and Groups lines of /proc/PID/status.
func procIDs(t *testing.T, pid int) (uid, gid string, groups []string) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 1 {
			continue
		}
		switch f[0] {
		case "Uid:":
			uid = f[1]
		case "Gid:":
			gid = f[1]
		case "Groups:":
			groups = f[1:]
		}
	}
	return uid, gid, groups
}

// requireRoot fails (under GOROLLING_CI) or skips a test that must run as
// root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("GOROLLING_CI") != "" {
		t.Fatal("CI must run the tests as root")
	}
	t.Skip("needs root")
}

// nobodyIDs returns the uid and gid of the account "nobody".
func nobodyIDs(t *testing.T) (int, int) {
	t.Helper()
	u, err := user.Lookup("nobody")
	if err != nil {
		t.Fatalf("no user nobody: %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return uid, gid
}

// openDir returns a new directory that every account can reach (its
// parents are made searchable), owned by root with mode 0755.
func openDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	return dir
}

// nobodyMaster starts a master whose workers run testworker as nobody with
// script; their reports go to a file nobody may write.
func nobodyMaster(t *testing.T, workers int, script string, o masterOpts) (*proc, string) {
	t.Helper()
	dir := openDir(t)
	rdir := filepath.Join(dir, "reports")
	if err := os.Mkdir(rdir, 0o777); err != nil {
		t.Fatal(err)
	}
	os.Chmod(rdir, 0o777)
	report := filepath.Join(rdir, "report.jsonl")
	o.args = append([]string{"-w", strconv.Itoa(workers), "--user", "nobody"}, append(o.args, "--", binPath("testworker"))...)
	o.env = append(o.env, "TW_SCRIPT="+script, "TW_REPORT="+report)
	p := startMaster(t, o)
	return p, report
}

// statusOf asks the master for status --json.
func statusOf(t *testing.T, ctl string) map[string]any {
	t.Helper()
	code, out, errOut := gorolling(t, nil, "status", "--json", "--control", ctl)
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, errOut)
	}
	var st map[string]any
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	return st
}

// fileID is what a test checks to tell that a file was left alone.
type fileID struct {
	ino  uint64
	uid  uint32
	gid  uint32
	mode uint32
	data string
}

func identify(t *testing.T, path string) fileID {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	id := fileID{ino: st.Ino, uid: st.Uid, gid: st.Gid, mode: st.Mode}
	if st.Mode&unix.S_IFMT == unix.S_IFREG {
		id.data = string(readFile(t, path))
	}
	return id
}

// masterPIDs lists the live gorolling master processes started from dir
// (processes running a gorolling binary there with "exec" in argv).
func masterPIDs(t *testing.T, exe string) []int {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || !alive(pid) {
			continue
		}
		l, err := os.Readlink("/proc/" + e.Name() + "/exe")
		if err != nil || strings.TrimSuffix(l, " (deleted)") != exe {
			continue
		}
		cmdline, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if slices.Contains(strings.Split(string(cmdline), "\x00"), "exec") {
			out = append(out, pid)
		}
	}
	return out
}

// masterUpgrade sends SIGUSR2 to the master in pidFile and waits until the
// new master serves, the old one has exited and the PID file names the new
// one. It returns the new master's pid.
func masterUpgrade(t *testing.T, p *proc, pidFile string) int {
	t.Helper()
	old := readPID(t, pidFile)
	from := len(p.entries())
	if err := syscall.Kill(old, syscall.SIGUSR2); err != nil {
		t.Fatalf("signal master %d: %v", old, err)
	}
	e, _ := p.waitLog(60*time.Second, from, "the new master", func(e entry) bool {
		return e.event() == events.MasterUpgradeServing || e.event() == events.MasterUpgradeFailed
	})
	if e.event() != events.MasterUpgradeServing {
		t.Fatalf("master upgrade failed: %s", e.str("reason"))
	}
	newPID := e.num("pid")
	deadline := time.Now().Add(60 * time.Second)
	for alive(old) || readPID(t, pidFile) != newPID {
		if time.Now().After(deadline) {
			t.Fatalf("old master %d alive %v, pid file %d, new master %d", old, alive(old), readPID(t, pidFile), newPID)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return newPID
}

// replaceFile atomically replaces path with content (mode 0755).
func replaceFile(t *testing.T, path string, content []byte) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, content, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// note is one sd_notify datagram and its sender's pid.
type note struct {
	pid  int
	text string
}

// listenNotify plays systemd's notify socket: it returns a NOTIFY_SOCKET
// path and the datagrams that arrive, with their senders' pids
// (SCM_CREDENTIALS).
func listenNotify(t *testing.T) (string, <-chan note) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rc, _ := c.SyscallConn()
	rc.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
	notes := make(chan note, 256)
	go func() {
		buf, oob := make([]byte, 4096), make([]byte, 1024)
		for {
			n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			pid := 0
			if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, m := range msgs {
					if cr, err := unix.ParseUnixCredentials(&m); err == nil {
						pid = int(cr.Pid)
					}
				}
			}
			notes <- note{pid, string(buf[:n])}
		}
	}()
	return sock, notes
}

// exampleMaster runs the example server with workers workers on a fresh
// loopback port and waits until it serves.
func exampleMaster(t *testing.T, workers int, extra ...string) (*proc, string) {
	t.Helper()
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	args := append([]string{"-w", strconv.Itoa(workers), "--", binPath("example-server"), "-listen", addr}, extra...)
	p := startMaster(t, masterOpts{args: args})
	p.waitServing()
	waitHTTP(t, addr, 10*time.Second)
	return p, addr
}

// masterStatus asks the master for its status.
func masterStatus(t *testing.T, p *proc) control.Status {
	t.Helper()
	resp, err := control.Call(p.controlPath(), control.Request{Cmd: "status"}, 10*time.Second)
	if err != nil || resp.Status == nil {
		t.Fatalf("status: %v", err)
	}
	return *resp.Status
}
