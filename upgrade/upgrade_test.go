package upgrade

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// The rollover policy, tested through the fleet seam: generations are
// values whose readiness the test decides.

type fakeGen struct {
	n       int
	ready   chan error // what waitReady returns; nil means ready
	mu      sync.Mutex
	drained bool
}

func (g *fakeGen) number() int        { return g.n }
func (g *fakeGen) started() time.Time { return time.Now() }
func (g *fakeGen) waitReady(ctx context.Context) error {
	select {
	case err := <-g.ready:
		return err
	case <-ctx.Done():
		return fmt.Errorf("0 of 1 workers ready: %w", ctx.Err())
	}
}
func (g *fakeGen) waitFirst(ctx context.Context) error { return g.waitReady(ctx) }
func (g *fakeGen) readyTiming() time.Duration          { return time.Millisecond }
func (g *fakeGen) drain() {
	g.mu.Lock()
	g.drained = true
	g.mu.Unlock()
}
func (g *fakeGen) isDrained() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.drained
}

// fakeFleet makes generations; ready(n) says what generation n's wait
// returns (a nil channel: it never gets ready).
type fakeFleet struct {
	mu    sync.Mutex
	gens  []*fakeGen
	serve *fakeGen
	ready func(n int) chan error
}

func (f *fakeFleet) resolve() (string, error) { return "/fake/server", nil }

func (f *fakeFleet) startGeneration(path string, serving bool) (generation, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	g := &fakeGen{n: len(f.gens) + 1}
	g.ready = f.ready(g.n)
	f.gens = append(f.gens, g)
	if serving {
		f.serve = g
	}
	return g, nil
}

func (f *fakeFleet) promote(g generation) (generation, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	old := f.serve
	f.serve = g.(*fakeGen)
	if old == nil || old == g {
		return nil, nil
	}
	return old, nil
}

func (f *fakeFleet) serving() generation {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.serve == nil {
		return nil
	}
	return f.serve
}

func (f *fakeFleet) counters() (int, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.gens), 0
}

func (f *fakeFleet) stopping() bool { return false }

func (f *fakeFleet) gen(n int) *fakeGen {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.gens[n-1]
}

func (f *fakeFleet) started() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.gens)
}

func readyAt(err error) chan error {
	ch := make(chan error, 1)
	ch <- err
	return ch
}

func allReady(int) chan error { return readyAt(nil) }

// run starts a manager over fl and returns it with a channel that is
// closed when Run has returned, and Run's error then.
func run(t *testing.T, fl *fakeFleet, readyTimeout time.Duration) (*Manager, chan struct{}, *error) {
	t.Helper()
	u := newManager(fl, Config{ReadyTimeout: readyTimeout})
	done := make(chan struct{})
	var err error
	go func() { err = u.Run(); close(done) }()
	t.Cleanup(func() {
		u.Stop()
		<-done
	})
	return u, done, &err
}

func result(t *testing.T, ch <-chan Result) Result {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(2 * time.Second):
		t.Fatal("no result")
		return Result{}
	}
}

// TestRollover: a workers upgrade starts generation 2, promotes it once it
// is ready and drains generation 1.
func TestRollover(t *testing.T) {
	fl := &fakeFleet{ready: allReady}
	u, _, _ := run(t, fl, time.Second)
	r := result(t, u.Trigger(Workers))
	if r.err != nil || r.kind != Workers || r.from != 1 || r.to != 2 {
		t.Fatalf("result %+v", r)
	}
	if !fl.gen(1).isDrained() || fl.gen(2).isDrained() || fl.serving() != fl.gen(2) {
		t.Fatal("generation 1 should be drained and generation 2 serve")
	}
}

// TestRollbackOnExit: a new generation that fails is drained and the old
// one keeps serving.
func TestRollbackOnExit(t *testing.T) {
	fl := &fakeFleet{ready: func(n int) chan error {
		if n == 2 {
			return readyAt(errors.New("worker slot 0 (pid 7) exit status 1 before the generation was ready"))
		}
		return readyAt(nil)
	}}
	u, _, _ := run(t, fl, time.Second)
	r := result(t, u.Trigger(Workers))
	if r.err == nil || !strings.Contains(r.err.Error(), "exit status 1") || r.to != 2 {
		t.Fatalf("result %+v", r)
	}
	if !fl.gen(2).isDrained() || fl.gen(1).isDrained() || fl.serving() != fl.gen(1) {
		t.Fatal("generation 2 should be drained and generation 1 serve")
	}
}

// TestRollbackOnTimeout: a new generation not ready within the ready
// timeout is rolled back with a reason that names the timeout.
func TestRollbackOnTimeout(t *testing.T) {
	fl := &fakeFleet{ready: func(n int) chan error {
		if n == 2 {
			return nil // never ready
		}
		return readyAt(nil)
	}}
	u, _, _ := run(t, fl, 30*time.Millisecond)
	r := result(t, u.Trigger(Workers))
	if r.err == nil || !strings.Contains(r.err.Error(), "not ready within 30ms") || !errors.Is(r.err, context.DeadlineExceeded) {
		t.Fatalf("result %+v", r)
	}
	if !fl.gen(2).isDrained() || fl.serving() != fl.gen(1) {
		t.Fatal("generation 2 should be drained and generation 1 serve")
	}
}

// TestCoalescing: requests made while an upgrade runs become one more
// upgrade after it, of the largest kind asked: a master upgrade absorbs
// worker upgrades. When that master upgrade fails, the worker upgrades it
// absorbed still run: those callers get the rollover, the one that asked
// for the master its failure.
func TestCoalescing(t *testing.T) {
	release := make(chan error)
	fl := &fakeFleet{ready: func(n int) chan error {
		if n == 2 {
			return release
		}
		return readyAt(nil)
	}}
	u, _, _ := run(t, fl, 5*time.Second)
	first := u.Trigger(Workers)
	for fl.started() < 2 {
		time.Sleep(time.Millisecond)
	}
	kinds := []Kind{Workers, Auto, Master, Workers}
	var later []<-chan Result
	for _, k := range kinds {
		later = append(later, u.Trigger(k))
	}
	release <- nil
	if r := result(t, first); r.err != nil || r.to != 2 {
		t.Fatalf("first upgrade %+v", r)
	}
	for i, ch := range later {
		r := result(t, ch)
		if kinds[i] == Master {
			// This process has no Self: the master upgrade fails, as it
			// must, without starting a generation of its own.
			if r.kind != Master || r.err == nil || !strings.Contains(r.err.Error(), "not available") {
				t.Fatalf("request %d (master): %+v, want the master upgrade's failure", i, r)
			}
			continue
		}
		if r.kind != Workers || r.err != nil || r.to != 3 || r.masterErr == nil {
			t.Fatalf("request %d (%s): %+v, want the one rollover to generation 3 after the master upgrade failed", i, kinds[i], r)
		}
	}
	if n := fl.started(); n != 3 {
		t.Fatalf("%d generations started, want 3 (the first, the upgrade, the fallback)", n)
	}
}

// TestMasterOnlyFailureRollsNothing: a master upgrade nobody merged a
// worker request into fails on its own; no generation starts.
func TestMasterOnlyFailureRollsNothing(t *testing.T) {
	fl := &fakeFleet{ready: func(int) chan error { return readyAt(nil) }}
	u, _, _ := run(t, fl, 5*time.Second)
	r := result(t, u.Trigger(Master))
	if r.kind != Master || r.err == nil {
		t.Fatalf("master upgrade without Self: %+v, want a failure", r)
	}
	if n := fl.started(); n != 1 {
		t.Fatalf("%d generations started, want only the first", n)
	}
}

// TestRequestBeforeStart: a request made while the first generation starts
// waits for it, then runs.
func TestRequestBeforeStart(t *testing.T) {
	release := make(chan error)
	fl := &fakeFleet{ready: func(n int) chan error {
		if n == 1 {
			return release
		}
		return readyAt(nil)
	}}
	u, _, _ := run(t, fl, 5*time.Second)
	ch := u.Trigger(Workers)
	time.Sleep(10 * time.Millisecond)
	if n := fl.started(); n != 1 {
		t.Fatalf("%d generations started before the first served", n)
	}
	release <- nil
	if r := result(t, ch); r.err != nil || r.from != 1 || r.to != 2 {
		t.Fatalf("result %+v", r)
	}
}

// TestStop: Stop interrupts a running upgrade (its generation is drained),
// answers queued requests with errStopping, and makes Run return nil.
func TestStop(t *testing.T) {
	fl := &fakeFleet{ready: func(n int) chan error {
		if n == 2 {
			return nil // blocks until the stop
		}
		return readyAt(nil)
	}}
	u, done, runErr := run(t, fl, time.Minute)
	running := u.Trigger(Workers)
	for fl.started() < 2 {
		time.Sleep(time.Millisecond)
	}
	queued := u.Trigger(Workers)
	u.Stop()
	if r := result(t, running); !errors.Is(r.err, errStopping) {
		t.Fatalf("running upgrade: %+v", r)
	}
	if r := result(t, queued); !errors.Is(r.err, errStopping) {
		t.Fatalf("queued upgrade: %+v", r)
	}
	select {
	case <-done:
		if *runErr != nil {
			t.Fatalf("Run returned %v", *runErr)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Run did not return")
	}
	if !fl.gen(2).isDrained() {
		t.Fatal("the interrupted generation was not drained")
	}
	if r := result(t, u.Trigger(Workers)); !errors.Is(r.err, errStopping) {
		t.Fatalf("a request after the stop: %+v", r)
	}
}

// TestFirstStartFails: Run returns the first generation's failure.
func TestFirstStartFails(t *testing.T) {
	fl := &fakeFleet{ready: func(int) chan error { return readyAt(errors.New("every worker exited before it was ready")) }}
	u := newManager(fl, Config{ReadyTimeout: time.Second})
	if err := u.Run(); err == nil || !strings.Contains(err.Error(), "every worker exited") {
		t.Fatalf("Run: %v", err)
	}
	if !fl.gen(1).isDrained() {
		t.Fatal("the failed first generation was not drained")
	}
}

func TestParseKind(t *testing.T) {
	for in, want := range map[string]Kind{"": Auto, "auto": Auto, "workers": Workers, "master": Master} {
		if k, err := ParseKind(in); err != nil || k != want || (in != "" && k.String() != in) {
			t.Errorf("ParseKind(%q) = %v, %v", in, k, err)
		}
	}
	if _, err := ParseKind("everything"); err == nil {
		t.Error("ParseKind accepted a bad kind")
	}
}

// TestResizeDuringMasterUpgrade: while a master upgrade holds the worker
// count it exported, a scale is refused rather than lost with this
// master; once this master was replaced, too; otherwise it runs.
func TestResizeDuringMasterUpgrade(t *testing.T) {
	u := newManager(&fakeFleet{ready: func(int) chan error { return readyAt(nil) }}, Config{})
	ran := 0
	scale := func() error { ran++; return nil }
	if err := u.Resize(scale); err != nil || ran != 1 {
		t.Fatalf("scale with no master upgrade: %v, ran %d times", err, ran)
	}
	u.resizeMu.Lock() // as runMaster holds it around the re-exec
	err := u.Resize(scale)
	u.resizeMu.Unlock()
	if err == nil || !strings.Contains(err.Error(), "master upgrade is running") || ran != 1 {
		t.Fatalf("scale during a master upgrade: %v, ran %d times; want a refusal", err, ran)
	}
	u.replaced = true
	if err := u.Resize(scale); err == nil || ran != 1 {
		t.Fatalf("scale after this master was replaced: %v, ran %d times; want a refusal", err, ran)
	}
}
