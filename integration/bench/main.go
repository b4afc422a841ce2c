// Command bench measures gorolling against the same example server run
// standalone, and reports:
//
//   - requests/s through gorolling with N workers next to N standalone
//     copies sharing the port with SO_REUSEPORT (keep-alive and a new
//     connection per request), and their ratio;
//   - upgrade timing: from SIGHUP to the new generation serving and to the
//     old one gone, the program's own start time, and the master's
//     overhead (the difference);
//   - the master's RSS and descriptor count after start and after many
//     upgrades;
//   - how evenly workers share the load: Jain's fairness index of the
//     requests each worker answered, over 1-s windows;
//   - with -only handoff, what an upgrade costs keep-alive clients with
//     the connection hand-off and with the old drain (-no-handoff), side by
//     side: failures, connections the server closed, HUP until the old
//     generation is gone, and the master's CPU per handed-over
//     connection;
//   - with -only crash, what a master killed with SIGKILL costs under a
//     service manager with an fd store (integration/fakesystemd): failed
//     requests, the time until a new master is ready, request latency.
//
// Run it from the repository root:
//
//	go run ./integration/bench -workers 4
//
// It builds its own binaries, uses loopback only, and cleans up the
// processes it starts.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/master/procfs"
)

var (
	workers  = flag.Int("workers", 4, "worker processes (N)")
	clients  = flag.Int("clients", 32, "concurrent clients")
	duration = flag.Duration("duration", 5*time.Second, "length of one throughput run")
	rounds   = flag.Int("rounds", 3, "throughput runs per mode (alternating; the median is reported)")
	upgrades = flag.Int("upgrades", 100, "upgrades for the timing and memory measurement")
	starts   = flag.Int("starts", 20, "standalone start-time samples")
	only     = flag.String("only", "", "run only this part: throughput, upgrades, master, crash or handoff")
	hups     = flag.Int("hups", 20, "upgrades per run for -only handoff")
	kills    = flag.Int("kills", 10, "master kills for -only crash")
)

var binDir string

func main() {
	flag.Parse()
	dir, err := os.MkdirTemp("", "gorolling-bench-")
	check(err)
	defer os.RemoveAll(dir)
	binDir = dir
	build := exec.Command("go", "build", "-o", dir+"/", "./cmd/gorolling", "./cmd/example-server", "./integration/fakesystemd")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	check(build.Run())

	fmt.Printf("gorolling benchmark: %s, %d CPUs, %s/%s, N=%d workers, %d clients, %s x %d rounds per mode\n\n",
		runtime.Version(), runtime.NumCPU(), runtime.GOOS, runtime.GOARCH, *workers, *clients, *duration, *rounds)

	if *only == "" || *only == "throughput" {
		throughput()
		fairness()
	}
	switch *only {
	case "throughput":
	case "master":
		masterUpgradeTiming()
	case "crash":
		crashCost()
	case "handoff":
		handoffCost()
	default:
		upgradeTiming()
	}
}

// started are the processes the benchmark started (masters and standalone
// servers, by pid); check stops them before it exits on an error.
var (
	startedMu sync.Mutex
	started   []int
)

func track(pid int) {
	startedMu.Lock()
	started = append(started, pid)
	startedMu.Unlock()
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		startedMu.Lock()
		for _, pid := range started {
			syscall.Kill(pid, syscall.SIGTERM)
		}
		startedMu.Unlock()
		time.Sleep(2 * time.Second)
		os.RemoveAll(binDir)
		os.Exit(1)
	}
}

// master is a running gorolling master with its JSON log.
type master struct {
	cmd   *exec.Cmd
	mu    sync.Mutex
	logs  []map[string]any
	stamp []time.Time // when each line arrived
	wake  chan struct{}
}

func startMaster(args ...string) *master { return startWrapped(nil, args...) }

// startWrapped starts the master through wrap (a command that runs it).
func startWrapped(wrap []string, args ...string) *master {
	a := append([]string{filepath.Join(binDir, "gorolling"), "exec", "--log-format", "json", "--log-level", "debug", "--control", "none", "-w", strconv.Itoa(*workers)}, args...)
	a = append(append([]string(nil), wrap...), a...)
	cmd := exec.Command(a[0], a[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stderr, err := cmd.StderrPipe()
	check(err)
	check(cmd.Start())
	track(cmd.Process.Pid)
	m := &master{cmd: cmd, wake: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var e map[string]any
			if json.Unmarshal(sc.Bytes(), &e) != nil {
				continue
			}
			m.mu.Lock()
			m.logs = append(m.logs, e)
			m.stamp = append(m.stamp, time.Now())
			close(m.wake)
			m.wake = make(chan struct{})
			m.mu.Unlock()
		}
	}()
	return m
}

// wait returns the first entry at index >= from with message msg.
func (m *master) wait(from int, msg string) (map[string]any, time.Time, int) {
	deadline := time.After(2 * time.Minute)
	for i := from; ; {
		m.mu.Lock()
		for ; i < len(m.logs); i++ {
			if m.logs[i]["@message"] == msg {
				e, at := m.logs[i], m.stamp[i]
				m.mu.Unlock()
				return e, at, i
			}
		}
		w := m.wake
		m.mu.Unlock()
		select {
		case <-w:
		case <-deadline:
			m.mu.Lock()
			for _, e := range m.logs[max(0, len(m.logs)-15):] {
				fmt.Fprintln(os.Stderr, e)
			}
			m.mu.Unlock()
			check(fmt.Errorf("timed out waiting for %q", msg))
		}
	}
}

func (m *master) len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.logs)
}

func (m *master) stop() {
	m.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { m.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(40 * time.Second):
		m.cmd.Process.Kill()
		<-done
	}
}

// load runs the clients against addr for d and returns requests/s and
// failures, and the requests each serving pid answered.
func load(addr string, d time.Duration, keepAlive bool) (float64, int64, map[string]int) {
	return loadTimed(addr, d, keepAlive, nil)
}

// loadTimed is load that also passes every answered request's latency to
// record (if set), from its own goroutine.
func loadTimed(addr string, d time.Duration, keepAlive bool, record func(time.Duration, string)) (float64, int64, map[string]int) {
	var ok, failed atomic.Int64
	var pmu sync.Mutex
	byPid := map[string]int{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	req := "GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
	if !keepAlive {
		req = "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
	}
	for i := 0; i < *clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var c net.Conn
			var br *bufio.Reader
			for {
				select {
				case <-stop:
					if c != nil {
						c.Close()
					}
					return
				default:
				}
				t0 := time.Now()
				if c == nil {
					var err error
					c, err = net.Dial("tcp", addr)
					if err != nil {
						failed.Add(1)
						continue
					}
					br = bufio.NewReader(c)
				}
				_, err := io.WriteString(c, req)
				var resp *http.Response
				if err == nil {
					resp, err = http.ReadResponse(br, nil)
				}
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				if err != nil || resp.StatusCode != 200 {
					failed.Add(1)
					c.Close()
					c = nil
					continue
				}
				ok.Add(1)
				if record != nil {
					record(time.Since(t0), resp.Header.Get("X-Pid"))
				}
				pmu.Lock()
				byPid[resp.Header.Get("X-Pid")]++
				pmu.Unlock()
				if !keepAlive || resp.Close {
					c.Close()
					c = nil
				}
			}
		}()
	}
	start := time.Now()
	time.Sleep(d)
	close(stop)
	wg.Wait()
	return float64(ok.Load()) / time.Since(start).Seconds(), failed.Load(), byPid
}

// spread renders the smallest and largest share of requests one worker
// answered.
func spread(byPid map[string]int) string {
	total, lo, hi := 0, -1, 0
	for _, n := range byPid {
		total += n
		if lo < 0 || n < lo {
			lo = n
		}
		hi = max(hi, n)
	}
	if total == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f%%..%.0f%%", 100*float64(lo)/float64(total), 100*float64(hi)/float64(total))
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// standalone starts N example servers sharing port with SO_REUSEPORT.
func standalone(port int) func() {
	var cmds []*exec.Cmd
	for i := 0; i < *workers; i++ {
		cmd := exec.Command(filepath.Join(binDir, "example-server"), "-reuseport", "-print-ready", "-listen", "127.0.0.1:"+strconv.Itoa(port))
		out, err := cmd.StdoutPipe()
		check(err)
		check(cmd.Start())
		track(cmd.Process.Pid)
		br := bufio.NewReader(out)
		_, err = br.ReadString('\n')
		check(err)
		go io.Copy(io.Discard, br)
		cmds = append(cmds, cmd)
	}
	return func() {
		for _, c := range cmds {
			c.Process.Signal(syscall.SIGTERM)
		}
		for _, c := range cmds {
			c.Wait()
		}
	}
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func pct(xs []float64, p float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[int(p*float64(len(s)-1))]
}

func throughput() {
	fmt.Println("== Throughput (requests/s, median of rounds; per-worker share of requests, min..max) ==")
	fmt.Printf("%-22s %12s %12s %12s %8s %8s %9s\n", "mode", "gorolling", "--reuseport", "standalone", "ratio", "ratio-rp", "failures")
	for _, keepAlive := range []bool{true, false} {
		var gr, rp, sa []float64
		var fails int64
		var grShare, rpShare, saShare map[string]int
		for r := 0; r < *rounds; r++ {
			for _, reuse := range []bool{false, true} {
				args := []string{filepath.Join(binDir, "example-server"), "-listen", "127.0.0.1:0"}
				if reuse {
					args = append([]string{"--reuseport", "--"}, args...)
				}
				m := startMaster(args...)
				m.wait(0, "generation serving")
				e, _, _ := m.wait(0, "listener handed over")
				rps, f, share := load(e["addr"].(string), *duration, keepAlive)
				if reuse {
					rp, rpShare = append(rp, rps), share
				} else {
					gr, grShare = append(gr, rps), share
				}
				fails += f
				m.stop()
			}
			port := freePort()
			stop := standalone(port)
			rps, f, share := load("127.0.0.1:"+strconv.Itoa(port), *duration, keepAlive)
			sa, saShare = append(sa, rps), share
			fails += f
			stop()
		}
		name := "keep-alive"
		if !keepAlive {
			name = "new connection each"
		}
		g, r, st := median(gr), median(rp), median(sa)
		fmt.Printf("%-22s %12.0f %12.0f %12.0f %8.3f %8.3f %9d\n", name, g, r, st, g/st, r/st, fails)
		fmt.Printf("%-22s %12s %12s %12s\n", "  (all rounds)", fmtList(gr), fmtList(rp), fmtList(sa))
		fmt.Printf("%-22s %12s %12s %12s\n", "  (share, last round)", spread(grShare), spread(rpShare), spread(saShare))
	}
	fmt.Println()
}

func fmtList(xs []float64) string {
	var s []string
	for _, x := range xs {
		s = append(s, strconv.Itoa(int(x)))
	}
	return strings.Join(s, ",")
}

func rss(pid int) (kib int) {
	b, err := procfs.ResidentBytes(pid)
	check(err)
	return int(b / 1024)
}

func fds(pid int) int {
	n, err := procfs.OpenFDs(pid)
	check(err)
	return n
}

func ms(d float64) string { return fmt.Sprintf("%.2f ms", d) }

type upgradeSample struct {
	toServing, toGone, workerStart, overhead []float64
	marks                                    map[int][2]int
	rss0, fd0                                int
}

// measureUpgrades runs n worker upgrades on a fresh master (extra flags
// before "--") and collects timings, and RSS/fd marks.
func measureUpgrades(n int, extra ...string) upgradeSample {
	args := append(extra, "--", filepath.Join(binDir, "example-server"), "-listen", "127.0.0.1:0")
	m := startMaster(args...)
	m.wait(0, "generation serving")
	pid := m.cmd.Process.Pid
	time.Sleep(200 * time.Millisecond)
	s := upgradeSample{marks: map[int][2]int{}, rss0: rss(pid), fd0: fds(pid)}
	for i := 1; i <= n; i++ {
		from := m.len()
		t0 := time.Now()
		check(m.cmd.Process.Signal(syscall.SIGHUP))
		ready, readyAt, _ := m.wait(from, "upgrade ready")
		_, doneAt, _ := m.wait(from, "upgrade finished")
		s.toServing = append(s.toServing, float64(readyAt.Sub(t0).Microseconds())/1000)
		s.toGone = append(s.toGone, float64(doneAt.Sub(t0).Microseconds())/1000)
		s.workerStart = append(s.workerStart, ready["worker_start"].(float64)/1e6)
		s.overhead = append(s.overhead, ready["overhead"].(float64)/1e6)
		if i == 10 || i == 50 || i%100 == 0 || i == n {
			time.Sleep(100 * time.Millisecond)
			s.marks[i] = [2]int{rss(pid), fds(pid)}
		}
	}
	m.stop()
	return s
}

func upgradeTiming() {
	// The program's own start time: N copies started at once, until each
	// says it is ready (the same work the master waits for).
	var own []float64
	for i := 0; i < *starts; i++ {
		port := freePort()
		t0 := time.Now()
		stop := standalone(port)
		own = append(own, float64(time.Since(t0).Microseconds())/1000)
		stop()
	}
	s := measureUpgrades(*upgrades)
	shim := measureUpgrades(min(*upgrades, 30), "--listen", "tcp://127.0.0.1:0")

	fmt.Printf("== Upgrade timing, N=%d, %d upgrades, no load (median / p90) ==\n", *workers, *upgrades)
	fmt.Printf("%-58s %12s %12s\n", "", "median", "p90")
	row := func(name string, xs []float64) {
		fmt.Printf("%-58s %12s %12s\n", name, ms(median(xs)), ms(pct(xs, 0.9)))
	}
	row("HUP -> new generation serving (seen by the caller)", s.toServing)
	row("HUP -> old generation gone (seen by the caller)", s.toGone)
	row("program's own start, N copies at once, standalone", own)
	row("program's own start, slowest worker, under gorolling", s.workerStart)
	row("master overhead: HUP->serving minus slowest worker start", s.overhead)
	fmt.Printf("%-58s %12s\n", "caller-side overhead: median(HUP->serving) - median(own)", ms(median(s.toServing)-median(own)))
	row("slowest worker start with --listen (LISTEN_PID shim)", shim.workerStart)
	fmt.Printf("%-58s %12s\n", "shim cost per spawn: difference of the medians", ms(median(shim.workerStart)-median(s.workerStart)))
	fmt.Println()

	fmt.Printf("== Master memory and descriptors across upgrades ==\n")
	fmt.Printf("%-24s %10s %6s\n", "after", "RSS", "fds")
	fmt.Printf("%-24s %7.1f MiB %6d\n", "start", float64(s.rss0)/1024, s.fd0)
	keys := []int{}
	for k := range s.marks {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fmt.Printf("%-24s %7.1f MiB %6d\n", fmt.Sprintf("%d upgrades", k), float64(s.marks[k][0])/1024, s.marks[k][1])
	}
	fmt.Println()
	masterUpgradeTiming()
}

// masterUpgradeTiming measures self-upgrades (SIGUSR2): until the new
// master serves, and until the old one is gone.
func masterUpgradeTiming() {
	n := 10
	dir, err := os.MkdirTemp("", "gorolling-bench-pid-")
	check(err)
	defer os.RemoveAll(dir)
	pidFile := filepath.Join(dir, "pid")
	m := startMaster("--pid-file", pidFile, "--", filepath.Join(binDir, "example-server"), "-listen", "127.0.0.1:0")
	m.wait(0, "generation serving")
	var serving, gone []float64
	for i := 0; i < n; i++ {
		b, err := os.ReadFile(pidFile)
		check(err)
		old, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		from := m.len()
		t0 := time.Now()
		check(syscall.Kill(old, syscall.SIGUSR2))
		e, at, _ := m.wait(from, "master upgrade: new master serving")
		track(int(e["pid"].(float64)))
		serving = append(serving, float64(at.Sub(t0).Microseconds())/1000)
		for alive(old) {
			time.Sleep(time.Millisecond)
		}
		gone = append(gone, float64(time.Since(t0).Microseconds())/1000)
	}
	b, _ := os.ReadFile(pidFile)
	last, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	syscall.Kill(last, syscall.SIGTERM)
	for alive(last) {
		time.Sleep(10 * time.Millisecond)
	}
	m.cmd.Wait()
	fmt.Printf("== Master self-upgrade (SIGUSR2), N=%d, %d upgrades, no load (median / p90) ==\n", *workers, n)
	fmt.Printf("%-58s %12s %12s\n", "USR2 -> new master serving its generation", ms(median(serving)), ms(pct(serving, 0.9)))
	fmt.Printf("%-58s %12s %12s\n", "USR2 -> old master and its workers gone", ms(median(gone)), ms(pct(gone, 0.9)))
}

func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

// crashCost kills the master with SIGKILL -kills times under load (a new
// connection per request) while fakesystemd keeps its sockets in an fd
// store and restarts it, and reports failures, the time from each kill to
// a new master's READY=1, and the latency of requests.
func crashCost() {
	m := startWrapped([]string{filepath.Join(binDir, "fakesystemd"), "--store-max", "4096", "--restart-sec", "100ms", "--"},
		"--", filepath.Join(binDir, "example-server"), "-listen", "127.0.0.1:0")
	e, _, _ := m.wait(0, "listener handed over")
	addr := e["addr"].(string)
	m.wait(0, "sd.ready")
	var lmu sync.Mutex
	var lat []float64
	record := func(d time.Duration, _ string) {
		lmu.Lock()
		lat = append(lat, float64(d.Microseconds())/1000)
		lmu.Unlock()
	}
	total := time.Duration(*kills)*time.Second + time.Second
	type result struct {
		rps    float64
		failed int64
	}
	res := make(chan result, 1)
	go func() {
		rps, failed, _ := loadTimed(addr, total, false, record)
		res <- result{rps, failed}
	}()
	var ready []float64
	time.Sleep(500 * time.Millisecond)
	for i := 0; i < *kills; i++ {
		main := 0
		m.mu.Lock()
		for _, e := range m.logs {
			if e["event"] == "sd.start" {
				main = int(e["pid"].(float64))
			}
		}
		m.mu.Unlock()
		from := m.len()
		t0 := time.Now()
		check(syscall.Kill(main, syscall.SIGKILL))
		_, at, _ := m.wait(from, "sd.ready")
		ready = append(ready, float64(at.Sub(t0).Microseconds())/1000)
		time.Sleep(time.Second - time.Since(t0)%time.Second)
	}
	r := <-res
	m.stop()
	lmu.Lock()
	defer lmu.Unlock()
	fmt.Printf("== Master killed with SIGKILL under a service manager with an fd store, N=%d, %d clients (new connection per request), %d kills ==\n", *workers, *clients, *kills)
	fmt.Printf("%-58s %12d\n", "requests answered", len(lat))
	fmt.Printf("%-58s %12d\n", "requests failed (refused, reset, lost)", r.failed)
	fmt.Printf("%-58s %12s %12s\n", "kill -> new master ready (median / max)", ms(median(ready)), ms(slices.Max(ready)))
	fmt.Printf("%-58s %12s %12s\n", "request latency over the run (p50 / p99)", ms(pct(lat, 0.5)), ms(pct(lat, 0.99)))
	fmt.Printf("%-58s %12s\n", "slowest request", ms(slices.Max(lat)))
}

// jain is Jain's fairness index of xs: 1 when all are equal, 1/n when one
// has everything.
func jain(xs []float64) float64 {
	var sum, sq float64
	for _, x := range xs {
		sum += x
		sq += x * x
	}
	if sq == 0 {
		return 0
	}
	return sum * sum / (float64(len(xs)) * sq)
}

// windowedJain runs the load for d and returns the median and minimum of
// Jain's index over 1-s windows of the requests each worker answered
// (workers seen in the run that answered nothing in a window count 0).
func windowedJain(addr string, d time.Duration, keepAlive bool) (float64, float64) {
	var mu sync.Mutex
	start := time.Now()
	win := map[int]map[string]int{}
	pids := map[string]bool{}
	loadTimed(addr, d, keepAlive, func(_ time.Duration, pid string) {
		w := int(time.Since(start) / time.Second)
		mu.Lock()
		if win[w] == nil {
			win[w] = map[string]int{}
		}
		win[w][pid]++
		pids[pid] = true
		mu.Unlock()
	})
	var js []float64
	for w := 0; w < int(d/time.Second); w++ { // whole windows only
		var xs []float64
		for pid := range pids {
			xs = append(xs, float64(win[w][pid]))
		}
		js = append(js, jain(xs))
	}
	if len(js) == 0 {
		return 0, 0
	}
	return median(js), slices.Min(js)
}

// fairness reports Jain's index over 1-s windows for the shared socket,
// --reuseport, and N standalone copies on one SO_REUSEPORT port.
func fairness() {
	fmt.Printf("== Fairness: Jain's index of requests per worker over 1-s windows, N=%d, %d clients (median / min) ==\n", *workers, *clients)
	fmt.Printf("%-22s %14s %14s %14s\n", "mode", "gorolling", "--reuseport", "standalone")
	for _, keepAlive := range []bool{true, false} {
		var cells []string
		for _, reuse := range []bool{false, true} {
			args := []string{filepath.Join(binDir, "example-server"), "-listen", "127.0.0.1:0"}
			if reuse {
				args = append([]string{"--reuseport", "--"}, args...)
			} else {
				args = append([]string{"--"}, args...)
			}
			m := startMaster(args...)
			m.wait(0, "generation serving")
			e, _, _ := m.wait(0, "listener handed over")
			med, lo := windowedJain(e["addr"].(string), *duration, keepAlive)
			cells = append(cells, fmt.Sprintf("%.3f / %.3f", med, lo))
			m.stop()
		}
		port := freePort()
		stop := standalone(port)
		med, lo := windowedJain("127.0.0.1:"+strconv.Itoa(port), *duration, keepAlive)
		cells = append(cells, fmt.Sprintf("%.3f / %.3f", med, lo))
		stop()
		name := "keep-alive"
		if !keepAlive {
			name = "new connection each"
		}
		fmt.Printf("%-22s %14s %14s %14s\n", name, cells[0], cells[1], cells[2])
	}
	fmt.Println()
}

// handoffCost runs, for N=1 and N=-workers, and for the hand-off and the
// old drain, -hups upgrades under 32 keep-alive clients that pause 0-100
// ms between requests, and reports what the clients saw and what the
// master spent.
func handoffCost() {
	fmt.Printf("== Upgrades under keep-alive load: hand-off against the old drain, %d HUPs per run, %d clients ==\n", *hups, *clients)
	fmt.Printf("%-14s %3s %9s %7s %13s %14s %14s %10s %14s\n", "drain", "N", "requests", "failed", "closed/upg", "HUP->gone med", "HUP->gone p90", "handed", "master CPU/conn")
	for _, n := range []int{1, *workers} {
		for _, handoff := range []bool{true, false} {
			port := freePort()
			addr := "127.0.0.1:" + strconv.Itoa(port)
			args := []string{"-w", strconv.Itoa(n), "--", filepath.Join(binDir, "example-server"), "-listen", addr}
			name := "hand-off"
			if !handoff {
				args = append(args, "-no-handoff")
				name = "close (old)"
			}
			m := startMaster(args...)
			m.wait(0, "generation serving")
			pid := m.cmd.Process.Pid
			var ok, failed, closed atomic.Int64
			stop := make(chan struct{})
			var wg sync.WaitGroup
			for i := 0; i < *clients; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					var c net.Conn
					var br *bufio.Reader
					defer func() {
						if c != nil {
							c.Close()
						}
					}()
					for {
						select {
						case <-stop:
							return
						case <-time.After(time.Duration(rand.IntN(100)) * time.Millisecond):
						}
						if c == nil {
							var err error
							if c, err = net.Dial("tcp", addr); err != nil {
								failed.Add(1)
								continue
							}
							br = bufio.NewReader(c)
						}
						c.SetDeadline(time.Now().Add(10 * time.Second))
						_, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
						var resp *http.Response
						if err == nil {
							resp, err = http.ReadResponse(br, nil)
						}
						if err == nil {
							_, err = io.Copy(io.Discard, resp.Body)
							resp.Body.Close()
						}
						if err != nil || resp.StatusCode != 200 {
							failed.Add(1)
							c.Close()
							c = nil
							continue
						}
						ok.Add(1)
						if resp.Close {
							closed.Add(1)
							c.Close()
							c = nil
						}
					}
				}()
			}
			time.Sleep(time.Second)
			st0, err := procfs.ReadStat(pid)
			check(err)
			var gone []float64
			for i := 0; i < *hups; i++ {
				from := m.len()
				t0 := time.Now()
				check(m.cmd.Process.Signal(syscall.SIGHUP))
				_, doneAt, _ := m.wait(from, "upgrade finished")
				gone = append(gone, float64(doneAt.Sub(t0).Microseconds())/1000)
				time.Sleep(300 * time.Millisecond)
			}
			st1, err := procfs.ReadStat(pid)
			check(err)
			close(stop)
			wg.Wait()
			handed := 0
			m.mu.Lock()
			for _, e := range m.logs {
				if e["event"] == "conn.handed_over" {
					handed++
				}
			}
			m.mu.Unlock()
			m.stop()
			perConn := "-"
			if handed > 0 {
				perConn = fmt.Sprintf("%.0f us", float64((st1.CPU-st0.CPU).Microseconds())/float64(handed))
			}
			fmt.Printf("%-14s %3d %9d %7d %13.1f %14s %14s %10d %14s\n", name, n, ok.Load(), failed.Load(),
				float64(closed.Load())/float64(*hups), ms(median(gone)), ms(pct(gone, 0.9)), handed, perConn)
		}
	}
	fmt.Println("(master CPU/conn: the master's user+system time over the upgrades, divided by the connections it handed over;")
	fmt.Println(" it includes the upgrades' own work, so it is an upper bound)")
	fmt.Println()
}
