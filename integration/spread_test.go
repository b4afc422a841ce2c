package integration

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/gorolling/gorolling/master/events"
)

// requestOn sends one GET on c (read through br) and returns the slot that
// answered.
func requestOn(t *testing.T, c net.Conn, br *bufio.Reader) int {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: spread\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	slot, err := strconv.Atoi(resp.Header.Get("X-Slot"))
	if err != nil {
		t.Fatalf("no X-Slot in %v", resp.Header)
	}
	return slot
}

// newConns makes n connections one after the other, one request each, and
// counts the answers by slot.
func newConns(t *testing.T, addr string, n int) map[int]int {
	t.Helper()
	got := map[int]int{}
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		got[requestOn(t, c, bufio.NewReader(c))]++
		c.Close()
	}
	return got
}

func wantEach(t *testing.T, what string, got map[int]int, slots []int, each int) {
	t.Helper()
	total := 0
	for _, n := range got {
		total += n
	}
	for _, s := range slots {
		if got[s] != each {
			t.Fatalf("%s: answers by slot %v, want %d for each of slots %v", what, got, each, slots)
		}
	}
	if total != each*len(slots) {
		t.Fatalf("%s: answers by slot %v, want only slots %v", what, got, slots)
	}
}

// TestEvenSpread: by default the master deals new connections to the
// slots in turn, for keep-alive and for new-connection traffic; a slot
// whose worker crashed gets none until its replacement is ready, and then
// its share again.
func TestEvenSpread(t *testing.T) {
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	// Worker id 5 is slot 1's replacement: it takes 3 s to start, so the
	// test sees the slot without a ready worker.
	p, _ := twMaster(t, 4, "id5:sleep 3s; listen tcp "+addr, masterOpts{})
	ready := 0
	p.waitLog(30*time.Second, 0, "4 ready workers", func(e entry) bool {
		if e.event() == events.WorkerReady {
			ready++
		}
		return ready == 4
	})
	waitHTTP(t, addr, 10*time.Second)

	// 32 keep-alive connections: 8 per worker.
	keep := map[int]int{}
	for i := 0; i < 32; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		br := bufio.NewReader(c)
		slot := requestOn(t, c, br)
		for j := 0; j < 3; j++ {
			if again := requestOn(t, c, br); again != slot {
				t.Fatalf("a keep-alive connection moved from slot %d to %d", slot, again)
			}
		}
		keep[slot]++
	}
	wantEach(t, "32 keep-alive connections", keep, []int{0, 1, 2, 3}, 8)
	wantEach(t, "40 new connections", newConns(t, addr, 40), []int{0, 1, 2, 3}, 10)

	// Slot 1's worker crashes.
	var victim int
	for _, e := range p.entries() {
		if e.event() == events.WorkerReady && e.num("slot") == 1 {
			victim = e.num("pid")
		}
	}
	if victim == 0 || !ours(victim) {
		t.Fatalf("no worker of slot 1 found (pid %d)", victim)
	}
	from := len(p.entries())
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	p.waitLog(10*time.Second, from, "the crash", func(e entry) bool {
		return (e.event() == events.WorkerExited || e.event() == events.WorkerRespawning) && e.num("pid") == victim
	})
	p.waitLog(10*time.Second, from, "the placement without slot 1", func(e entry) bool {
		return e.event() == events.PlacementUpdated && e.num("active") == 3
	})
	time.Sleep(10 * time.Millisecond) // the update is logged just before it applies
	wantEach(t, "30 new connections while slot 1 has no worker", newConns(t, addr, 30), []int{0, 2, 3}, 10)
	if n := p.count(func(e entry) bool { return e.event() == events.WorkerReady && e.num("worker_id") == 5 }); n != 0 {
		t.Fatal("slot 1's replacement was ready before the test ended its check: the check proved nothing")
	}
	_, at := p.waitLog(30*time.Second, from, "slot 1's replacement", func(e entry) bool {
		return e.event() == events.WorkerReady && e.num("worker_id") == 5
	})
	p.waitLog(10*time.Second, at, "the placement with slot 1", func(e entry) bool {
		return e.event() == events.PlacementUpdated && e.num("active") == 4
	})
	time.Sleep(10 * time.Millisecond)
	wantEach(t, "40 new connections once slot 1 is back", newConns(t, addr, 40), []int{0, 1, 2, 3}, 10)
}
