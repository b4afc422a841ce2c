package master

import (
	"context"
	"errors"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorolling/gorolling/handoff"
	"github.com/gorolling/gorolling/master/registry"
	"golang.org/x/sys/unix"
)

// The state machine of generations and slots, tested through the process
// and clock seams: every worker is a goroutine speaking the real handoff
// protocol over a real socketpair, and time moves only when a test says.

// fakeClock is a clock whose timers fire when the test advances it.
type fakeClock struct {
	mu     sync.Mutex
	t      time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	c       *fakeClock
	at      time.Time
	d       time.Duration
	f       func()
	stopped bool
	fired   bool
}

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := !t.stopped && !t.fired
	t.stopped = true
	return was
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) afterFunc(d time.Duration, f func()) timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, at: c.t.Add(d), d: d, f: f}
	c.timers = append(c.timers, t)
	return t
}

// advance moves time by d and runs the timers that are due, in order.
func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	var due []*fakeTimer
	for _, t := range c.timers {
		if !t.stopped && !t.fired && !t.at.After(c.t) {
			t.fired = true
			due = append(due, t)
		}
	}
	c.mu.Unlock()
	for _, t := range due {
		t.f()
	}
}

// pending returns the delays of the timers not yet fired or stopped.
func (c *fakeClock) pending() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []time.Duration
	for _, t := range c.timers {
		if !t.stopped && !t.fired {
			out = append(out, t.d)
		}
	}
	return out
}

// fakeProc is a worker process that is a goroutine.
type fakeProc struct {
	pid  int
	conn *handoff.Conn // the worker's end of the channel
	sigs chan syscall.Signal
	exit chan string
	once sync.Once

	mu    sync.Mutex
	got   []string // message types the master sent
	spawn procSpec
}

func (p *fakeProc) Pid() int { return p.pid }

func (p *fakeProc) Signal(sig syscall.Signal) {
	if sig == syscall.SIGKILL {
		p.exitWith("killed by signal SIGKILL")
		return
	}
	select {
	case p.sigs <- sig:
	default:
	}
}

func (p *fakeProc) Wait() (string, int) {
	d := <-p.exit
	p.conn.Close()
	return d, 0
}

func (p *fakeProc) exitWith(desc string) { p.once.Do(func() { p.exit <- desc }) }

func (p *fakeProc) ready() {
	p.conn.Send(&handoff.Message{V: handoff.Version, Type: handoff.TypeReady, Seq: 1})
}

func (p *fakeProc) received(typ string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, g := range p.got {
		if g == typ {
			return true
		}
	}
	return false
}

// behaviour is what a fake worker does once started.
type behaviour func(p *fakeProc)

// good says ready and exits 0 on the stop signal.
func good(p *fakeProc) {
	p.ready()
	p.stopOnSignal()
}

// stopOnSignal exits 0 on the stop signal, once the drain message that
// came before it has been read (a real worker reads it first too).
func (p *fakeProc) stopOnSignal() {
	<-p.sigs
	for end := time.Now().Add(time.Second); !p.received(handoff.TypeDrain) && time.Now().Before(end); {
		time.Sleep(time.Millisecond)
	}
	p.exitWith("exit status 0")
}

// stubborn says ready and ignores the stop signal.
func stubborn(p *fakeProc) { p.ready() }

// silent never says ready; it exits 0 on the stop signal.
func silent(p *fakeProc) { p.stopOnSignal() }

// crash exits 1 at once.
func crash(p *fakeProc) { p.exitWith("exit status 1") }

// fakeFleet starts fake processes; next picks each one's behaviour.
type fakeFleet struct {
	mu    sync.Mutex
	pid   int
	procs []*fakeProc
	next  func(n int) behaviour // n: 0 for the first process started
	// hold, if set for n, keeps the n-th start from returning until it is
	// closed: a fork that takes its time.
	hold map[int]chan struct{}
}

func (f *fakeFleet) start(sp procSpec) (process, error) {
	f.mu.Lock()
	wait := f.hold[len(f.procs)]
	f.mu.Unlock()
	if wait != nil {
		<-wait
	}
	ch := sp.Files[len(sp.Files)-1] // the handoff channel is the last
	fd, err := unix.FcntlInt(ch.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	conn, err := handoff.FromFD(fd)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.pid++
	p := &fakeProc{pid: 100000 + f.pid, conn: conn, sigs: make(chan syscall.Signal, 8), exit: make(chan string, 1), spawn: sp}
	b := f.next(len(f.procs))
	f.procs = append(f.procs, p)
	f.mu.Unlock()
	go func() { // record what the master sends
		for {
			m, _, err := conn.Receive()
			if err != nil {
				return
			}
			p.mu.Lock()
			p.got = append(p.got, m.Type)
			p.mu.Unlock()
		}
	}()
	go b(p)
	return p, nil
}

func (f *fakeFleet) proc(i int) *fakeProc {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.procs[i]
}

func (f *fakeFleet) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.procs)
}

func newTestMaster(t *testing.T, workers int, next func(int) behaviour) (*Master, *fakeFleet, *fakeClock) {
	t.Helper()
	fl := &fakeFleet{next: next}
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	reg := registry.New(registry.Options{})
	m, err := New(Config{
		Program: "/fake/server", Workers: workers, DrainTimeout: 10 * time.Second,
		Registry: reg, runtimeDir: t.TempDir(), start: fl.start, clock: clk,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		m.Kill()
		m.Stop()
		reg.Close(true)
	})
	return m, fl, clk
}

func always(b behaviour) func(int) behaviour { return func(int) behaviour { return b } }

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// eventually waits (a real, short while) for cond: goroutines react to the
// fakes' messages asynchronously.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(2 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// TestRollover: a first generation serves; a second starts, becomes ready
// and is promoted; the first drains (drain message, then the stop signal)
// and stops; the second serves and every worker got its identity.
func TestRollover(t *testing.T) {
	m, fl, _ := newTestMaster(t, 2, always(good))
	g1, err := m.StartGeneration("/fake/v1", true)
	if err != nil {
		t.Fatal(err)
	}
	if err := g1.WaitFirst(ctxFor(t, 2*time.Second)); err != nil {
		t.Fatal(err)
	}
	g2, err := m.StartGeneration("/fake/v2", false)
	if err != nil {
		t.Fatal(err)
	}
	if err := g2.WaitReady(ctxFor(t, 2*time.Second)); err != nil {
		t.Fatal(err)
	}
	if m.Serving() != g1 {
		t.Fatal("a starting generation serves before it is promoted")
	}
	old, err := m.Promote(g2)
	if err != nil || old != g1 {
		t.Fatalf("Promote returned %v, %v; want generation 1", old, err)
	}
	old.Drain()
	if m.Serving() != g2 || g1.state != genStopped {
		t.Fatalf("after the drain: serving %v, generation 1 %s", m.Serving(), g1.state)
	}
	for i := 0; i < 2; i++ {
		if p := fl.proc(i); !p.received(handoff.TypeDrain) {
			t.Errorf("worker %d of generation 1 was not told to drain", i)
		}
	}
	for i, want := range []string{"GOROLLING_GENERATION=2", "GOROLLING_SLOT=1", "GOROLLING_WORKER_ID=4"} {
		if env := strings.Join(fl.proc(3).spawn.Env, " "); !strings.Contains(env, want) {
			t.Errorf("check %d: the last worker's environment lacks %s: %s", i, want, env)
		}
	}
}

// TestRollbackOnExit: a worker of a starting generation that exits before
// it is ready fails the generation; nothing is respawned.
func TestRollbackOnExit(t *testing.T) {
	m, fl, _ := newTestMaster(t, 2, func(n int) behaviour {
		if n == 3 {
			return crash
		}
		return good
	})
	g1, _ := m.StartGeneration("/fake/v1", true)
	if err := g1.WaitFirst(ctxFor(t, 2*time.Second)); err != nil {
		t.Fatal(err)
	}
	g2, _ := m.StartGeneration("/fake/v2", false)
	err := g2.WaitReady(ctxFor(t, 2*time.Second))
	if err == nil || !strings.Contains(err.Error(), "exit status 1 before the generation was ready") {
		t.Fatalf("WaitReady: %v", err)
	}
	g2.Drain()
	if m.Serving() != g1 || fl.count() != 4 {
		t.Fatalf("after the rollback: serving %v, %d processes started (want generation 1, 4)", m.Serving(), fl.count())
	}
}

// TestRollbackOnTimeout: a generation whose workers never say ready fails
// the wait with how many were ready.
func TestRollbackOnTimeout(t *testing.T) {
	m, _, _ := newTestMaster(t, 2, func(n int) behaviour {
		if n < 2 {
			return good
		}
		return silent
	})
	g1, _ := m.StartGeneration("/fake/v1", true)
	if err := g1.WaitFirst(ctxFor(t, 2*time.Second)); err != nil {
		t.Fatal(err)
	}
	g2, _ := m.StartGeneration("/fake/v2", false)
	err := g2.WaitReady(ctxFor(t, 50*time.Millisecond))
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "0 of 2 workers ready") {
		t.Fatalf("WaitReady: %v", err)
	}
	g2.Drain()
	if m.Serving() != g1 {
		t.Fatal("the failed generation took over")
	}
}

// TestBackoff: a slot whose worker keeps crashing is respawned after 100
// ms, then twice as long each time up to 30 s; a worker that lived a
// minute resets the delay.
func TestBackoff(t *testing.T) {
	var mu sync.Mutex
	crashNow := true
	m, fl, clk := newTestMaster(t, 1, func(n int) behaviour {
		if n == 0 {
			return good
		}
		mu.Lock()
		defer mu.Unlock()
		if crashNow {
			return crash
		}
		return good
	})
	g, _ := m.StartGeneration("/fake/v1", true)
	if err := g.WaitFirst(ctxFor(t, 2*time.Second)); err != nil {
		t.Fatal(err)
	}
	fl.proc(0).exitWith("exit status 2") // the healthy first worker crashes once
	want := []time.Duration{100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000}
	for i, w := range want {
		w *= time.Millisecond
		eventually(t, "a respawn to be scheduled", func() bool { return len(clk.pending()) == 1 })
		if got := clk.pending()[0]; got != w {
			t.Fatalf("respawn %d after %s, want %s", i+1, got, w)
		}
		started := fl.count()
		clk.advance(w)
		eventually(t, "the respawn", func() bool { return fl.count() == started+1 })
	}
	// A worker that lives a minute resets the backoff.
	mu.Lock()
	crashNow = false
	mu.Unlock()
	eventually(t, "a respawn to be scheduled", func() bool { return len(clk.pending()) == 1 })
	n := fl.count()
	clk.advance(30 * time.Second)
	eventually(t, "the healthy respawn", func() bool { return fl.count() == n+1 })
	eventually(t, "it to be ready", func() bool {
		m.mu.Lock()
		defer m.mu.Unlock()
		return g.readyLocked() == 1
	})
	clk.advance(61 * time.Second)
	fl.proc(n).exitWith("exit status 2")
	eventually(t, "a respawn to be scheduled", func() bool { return len(clk.pending()) == 1 })
	if got := clk.pending()[0]; got != 100*time.Millisecond {
		t.Fatalf("after a minute of health the respawn waits %s, want 100ms", got)
	}
}

// TestScaleDuringUpgrade: scaling while an upgrade starts a generation is
// refused; afterwards the serving generation grows, and shrinks by
// draining its highest slots.
func TestScaleDuringUpgrade(t *testing.T) {
	m, fl, _ := newTestMaster(t, 2, always(good))
	g1, _ := m.StartGeneration("/fake/v1", true)
	if err := g1.WaitFirst(ctxFor(t, 2*time.Second)); err != nil {
		t.Fatal(err)
	}
	g2, _ := m.StartGeneration("/fake/v2", false)
	if err := m.Scale(3); err == nil || !strings.Contains(err.Error(), "an upgrade is starting") {
		t.Fatalf("scale during an upgrade: %v", err)
	}
	g2.Drain()
	if err := m.Scale(3); err != nil {
		t.Fatal(err)
	}
	if err := g1.WaitReady(ctxFor(t, 2*time.Second)); err != nil || len(g1.slots) != 3 {
		t.Fatalf("after scale 3: %v, %d slots", err, len(g1.slots))
	}
	n := fl.count()
	if err := m.Scale(1); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the removed slots to drain", func() bool {
		return fl.proc(n-1).received(handoff.TypeDrain) && fl.proc(1).received(handoff.TypeDrain)
	})
	if m.Size() != 1 || len(g1.slots) != 1 {
		t.Fatalf("size %d, %d slots after scale 1", m.Size(), len(g1.slots))
	}
}

// TestDrainKillsAfterTimeout: a worker that ignores the stop signal is
// killed once the drain timeout has passed, and the drain finishes.
func TestDrainKillsAfterTimeout(t *testing.T) {
	m, fl, clk := newTestMaster(t, 1, always(stubborn))
	g, _ := m.StartGeneration("/fake/v1", true)
	if err := g.WaitFirst(ctxFor(t, 2*time.Second)); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { g.Drain(); close(done) }()
	eventually(t, "the kill to be scheduled", func() bool { return len(clk.pending()) == 1 })
	select {
	case <-done:
		t.Fatal("the drain finished while the worker still runs")
	default:
	}
	clk.advance(10 * time.Second)
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("the drain did not finish after the kill")
	}
	// Sent before the kill was scheduled; the fake reads its channel on a
	// goroutine of its own.
	eventually(t, "the drain message to have reached the worker", func() bool { return fl.proc(0).received(handoff.TypeDrain) })
}

// TestWorkerEnv: the master's own protocol variables never reach a worker.
func TestWorkerEnv(t *testing.T) {
	got := workerEnv([]string{"PATH=/bin", "LISTEN_FDS=2", "LISTEN_PID=1", "NOTIFY_SOCKET=/run/x", "WATCHDOG_USEC=5", "GOROLLING_FD=9", "HOME=/root"}, "GOROLLING_SLOT=0")
	want := "PATH=/bin HOME=/root GOROLLING_SLOT=0"
	if strings.Join(got, " ") != want {
		t.Fatalf("got %v, want %s", got, want)
	}
}

// TestScaleDownDuringSpawn: a scale-down that removes a slot while its
// worker is being forked drains that worker as soon as it exists, so the
// stop that follows finishes instead of waiting for it for ever.
func TestScaleDownDuringSpawn(t *testing.T) {
	fork := make(chan struct{})
	fl := &fakeFleet{next: always(good), hold: map[int]chan struct{}{1: fork}}
	clk := &fakeClock{t: time.Unix(1e9, 0)}
	reg := registry.New(registry.Options{})
	defer reg.Close(true)
	m, err := New(Config{Program: "/fake/server", Workers: 2, DrainTimeout: 10 * time.Second, Registry: reg, runtimeDir: t.TempDir(), start: fl.start, clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan error, 1)
	go func() { _, err := m.StartGeneration("/fake/v1", true); started <- err }()
	eventually(t, "the first worker", func() bool { return fl.count() == 1 })
	// Slot 1's fork is in progress; the first generation already serves.
	if err := m.Scale(1); err != nil {
		t.Fatal(err)
	}
	close(fork)
	if err := <-started; err != nil {
		t.Fatal(err)
	}
	eventually(t, "the orphan to be told to drain", func() bool { return fl.count() == 2 && fl.proc(1).received(handoff.TypeDrain) })
	stopped := make(chan struct{})
	go func() { m.Stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(3 * time.Second):
		t.Fatal("Stop hangs on a worker whose slot was removed while it was forked")
	}
}
