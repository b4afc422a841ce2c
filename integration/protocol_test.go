package integration

import (
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorolling/gorolling/master/events"
)

// TestProtocolViolations: workers that send garbage, master-only messages,
// out-of-range requests or requests whose replies they never read are
// logged and stopped; the master neither dies nor leaks a descriptor: once
// a well-behaved worker has replaced them it holds as many descriptors as
// a master that never met a bad worker.
func TestProtocolViolations(t *testing.T) {
	bad := []struct{ op, reason string }{
		{`raw {not json`, "malformed"},
		{`raw {"v":1,"type":"drain","timeout_ms":5}`, "only the master sends"},
		{`raw {"v":1,"type":"listen","seq":1,"listen":{"network":"tcp","address":":1","index":99999}}`, "out of range"},
		{`raw {"v":7,"type":"ready","seq":1}`, "unsupported protocol version"},
		{`floodblind 3000`, "stopped reading its handoff channel"},
	}
	// Generation 1 (workers 1..n) behaves: a first generation must start.
	// Killing its workers makes the master respawn each slot; the
	// respawns, workers n+1..2n-1, misbehave, and their own replacements
	// behave again.
	n := len(bad) + 1
	var script []string
	for i, b := range bad {
		script = append(script, "id"+strconv.Itoa(n+1+i)+": "+b.op)
	}
	script = append(script, "listen tcp 127.0.0.1:0")
	p, _ := twMaster(t, n, strings.Join(script, "; "), masterOpts{})
	for _, pid := range p.workerPIDs(1) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	// Workers n+1..n+len(bad) misbehave (the flooding one even says ready
	// first); every slot is whole again once n later workers are ready.
	readyAgain := func(e entry) bool { return e.event() == events.WorkerReady && e.num("worker_id") > n+len(bad) }
	deadline := time.Now().Add(30 * time.Second)
	for p.count(readyAgain) < n {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d slots ready again", p.count(readyAgain), n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for i, b := range bad {
		id := n + 1 + i
		e, _ := p.waitLog(20*time.Second, 0, "violation of worker "+strconv.Itoa(id), func(e entry) bool {
			return e.event() == events.WorkerViolation && e.num("worker_id") == id
		})
		if e.level() != "error" || !strings.Contains(e.str("reason"), b.reason) {
			t.Errorf("worker %d (%s): logged at %s with reason %q, want %q", id, b.op, e.level(), e.str("reason"), b.reason)
		}
	}
	time.Sleep(200 * time.Millisecond)
	got := fdCount(t, p.pid)

	control, _ := twMaster(t, n, "listen tcp 127.0.0.1:0", masterOpts{})
	time.Sleep(200 * time.Millisecond)
	if want := fdCount(t, control.pid); got != want {
		t.Fatalf("master holds %d descriptors after %d bad workers (%v); a master that met none holds %d (%v)", got, len(bad), fdKinds(t, p.pid), want, fdKinds(t, control.pid))
	}
	if b := blockingSockets(t, p.pid); len(b) > 0 {
		t.Errorf("master sockets in blocking mode: %v", b)
	}
}

// TestHandoffFloodThrottled: a worker that sends valid requests as fast as
// it can is read at the master's pace, not stopped: the master logs it
// once and keeps answering status within a second.
func TestHandoffFloodThrottled(t *testing.T) {
	p, _ := twMaster(t, 2, "slot1: flood 3000; slot1: sleep 60s; listen tcp 127.0.0.1:0", masterOpts{args: []string{"--log-level", "info"}})
	var slowest time.Duration
	for i := 0; i < 10; i++ {
		slowest = max(slowest, statusLatency(t, p.controlPath()))
		time.Sleep(300 * time.Millisecond)
	}
	if slowest > time.Second {
		t.Errorf("status took %s during a handoff flood", slowest)
	}
	if n := p.count(isEvent(events.WorkerThrottled)); n != 1 {
		t.Errorf("the flood was logged %d times, want once", n)
	}
	if n := p.count(isEvent(events.WorkerViolation)); n != 0 {
		t.Errorf("a worker sending valid requests quickly was stopped")
	}
}

// TestWorkerCannotSendDescriptors: a worker has no descriptor to give the
// master. Where the kernel can (SO_PASSRIGHTS, Linux 6.16), it refuses
// them: the worker's sendmsg fails with EPERM and the master sees nothing.
// On older kernels the master discards what arrives and stops the worker.
// Either way the master holds no more descriptors than before.
func TestWorkerCannotSendDescriptors(t *testing.T) {
	p, report := twMaster(t, 2, `slot1: rawfd {"v":1,"type":"hello","seq":1}; slot1: rawmanyfd {"v":1,"type":"hello","seq":2}; listen tcp 127.0.0.1:0`, masterOpts{})
	rs := waitReports(t, report, 10*time.Second, "the sends", func(rs []twReport) bool { return len(opsOf(rs, "rawmanyfd", 1)) == 1 })
	time.Sleep(300 * time.Millisecond)
	refused := 0
	for _, r := range append(opsOf(rs, "rawfd", 1), opsOf(rs, "rawmanyfd", 1)...) {
		if strings.Contains(r.Err, "operation not permitted") {
			refused++
		}
	}
	violations := p.count(isEvent(events.WorkerViolation))
	t.Logf("%d of 2 sends refused by the kernel, %d violations logged", refused, violations)
	if refused == 0 && violations == 0 {
		t.Fatal("descriptors sent by a worker were neither refused nor treated as a violation")
	}
	control, _ := twMaster(t, 2, "listen tcp 127.0.0.1:0", masterOpts{})
	time.Sleep(300 * time.Millisecond)
	if got, want := fdCount(t, p.pid), fdCount(t, control.pid); got != want {
		t.Fatalf("master holds %d descriptors after a worker sent some (%v); a master that met none holds %d", got, fdKinds(t, p.pid), want)
	}
}
