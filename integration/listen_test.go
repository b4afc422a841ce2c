package integration

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorolling/gorolling/master/events"
	"golang.org/x/sys/unix"
)

// Row: Listen(":0") twice in every worker; the k-th port-0 listen of every
// worker, in every generation, gets the same port.
func TestListenPortZeroIndex(t *testing.T) {
	p, report := twMaster(t, 2, "listen tcp 127.0.0.1:0; listen tcp 127.0.0.1:0", masterOpts{})
	check := func(gen int) []string {
		rs := waitReports(t, report, 10*time.Second, "two listens per worker", func(rs []twReport) bool {
			return len(opsOf(rs, "listen", gen)) == 4
		})
		var want []string
		for pid, ls := range listensByPID(rs, "listen", gen) {
			var got []string
			for _, r := range ls {
				if r.Err != "" {
					t.Fatalf("worker %d: %s", pid, r.Err)
				}
				got = append(got, r.Addr)
			}
			if got[0] == got[1] {
				t.Fatalf("worker %d got the same address twice: %v", pid, got)
			}
			if want == nil {
				want = got
			} else if !slices.Equal(got, want) {
				t.Fatalf("generation %d: worker %d got %v, another got %v", gen, pid, got, want)
			}
		}
		return want
	}
	first := check(1)
	for _, a := range first {
		if pid, gen := get(t, a); gen != 1 || pid == 0 {
			t.Fatalf("%s served by pid %d generation %d", a, pid, gen)
		}
	}
	p.upgrade(30 * time.Second)
	if second := check(2); !slices.Equal(first, second) {
		t.Fatalf("generation 2 got %v, generation 1 had %v", second, first)
	}
	for _, a := range first {
		if _, gen := get(t, a); gen != 2 {
			t.Fatalf("%s served by generation %d after the upgrade", a, gen)
		}
	}
}

// Normalisation: spellings that mean the same socket share it.
func TestListenNormalisedAddressesShare(t *testing.T) {
	_, report := twMaster(t, 2,
		"slot0: listen tcp :0; slot1: listen tcp 0.0.0.0:0; slot0: listen tcp 127.0.0.1:0; slot1: listen tcp4 localhost:0", masterOpts{})
	rs := waitReports(t, report, 10*time.Second, "four listens", func(rs []twReport) bool { return len(opsOf(rs, "listen", 1)) == 4 })
	bySlot := map[int][]string{}
	for _, r := range opsOf(rs, "listen", 1) {
		if r.Err != "" {
			t.Fatalf("slot %d %s: %s", r.Slot, r.Arg, r.Err)
		}
		bySlot[r.Slot] = append(bySlot[r.Slot], r.Addr)
	}
	if !slices.Equal(bySlot[0], bySlot[1]) {
		t.Fatalf("slot 0 got %v, slot 1 got %v: equivalent addresses were not shared", bySlot[0], bySlot[1])
	}
}

// Row: fd:N wraps the master's inherited descriptor; a missing fd or one
// that is not listening gives a clear error with its errno.
func TestListenFD(t *testing.T) {
	lfd := rawSocket(t, unix.SOCK_STREAM, true)
	notListening := rawSocket(t, unix.SOCK_STREAM, false)
	ufd := rawSocket(t, unix.SOCK_DGRAM, false)
	files := []*os.File{os.NewFile(uintptr(lfd), "l"), os.NewFile(uintptr(notListening), "nl"), os.NewFile(uintptr(ufd), "u")}
	p, report := twMaster(t, 2, "listenfd 3; listenfd 4; listenfd 99; listenpacketfd 5; listenfd 5",
		masterOpts{files: files})
	laddr, uaddr := sockName(t, lfd), sockName(t, ufd)
	for _, f := range files {
		f.Close() // only the master and its workers hold them now
	}
	rs := waitReports(t, report, 10*time.Second, "fd listens", func(rs []twReport) bool {
		return len(opsOf(rs, "listenfd", 1)) == 8 && len(opsOf(rs, "listenpacketfd", 1)) == 2
	})
	for _, r := range opsOf(rs, "listenfd", 1) {
		switch r.Arg {
		case "3":
			if r.Err != "" || r.Addr != laddr {
				t.Errorf("listenfd 3: addr %q err %q, want %s", r.Addr, r.Err, laddr)
			}
		case "4":
			if r.Errno != strconv.Itoa(int(syscall.EINVAL)) || !strings.Contains(r.Err, "not listening") {
				t.Errorf("listenfd 4 (not listening): %q errno %s", r.Err, r.Errno)
			}
		case "99":
			if r.Errno != strconv.Itoa(int(syscall.EBADF)) || !strings.Contains(r.Err, "no inherited socket on fd 99") {
				t.Errorf("listenfd 99: %q errno %s", r.Err, r.Errno)
			}
		case "5":
			if r.Errno != strconv.Itoa(int(syscall.EPROTOTYPE)) || !strings.Contains(r.Err, "datagram") {
				t.Errorf("listenfd 5 (udp): %q errno %s", r.Err, r.Errno)
			}
		}
	}
	for _, r := range opsOf(rs, "listenpacketfd", 1) {
		if r.Err != "" || r.Addr != uaddr {
			t.Errorf("listenpacketfd 5: addr %q err %q, want %s", r.Addr, r.Err, uaddr)
		}
	}
	pids := p.workerPIDs(1)
	if pid, _ := get(t, laddr); !slices.Contains(pids, pid) {
		t.Errorf("fd 3 served by pid %d, not a worker %v", pid, pids)
	}
	if got := udpAsk(t, uaddr, "ping"); !strings.Contains(got, "got=ping") {
		t.Errorf("udp fd 5 answered %q", got)
	}
}

// Row: a unix socket path relative to the worker's directory; the master
// creates it once, a stale file is replaced, no worker unlinks it (it
// survives an upgrade) and the master removes it at stop.
func TestListenUnixSocketLifetime(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "app.sock")
	// A stale socket file, as a crashed master would leave.
	stale, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()

	p, _ := twMaster(t, 2, "listen unix app.sock", masterOpts{dir: dir})
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
	genOf := func() int {
		resp, err := client.Get("http://unix/")
		if err != nil {
			t.Fatalf("GET over %s: %v", sock, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		g, _ := strconv.Atoi(resp.Header.Get("X-Generation"))
		return g
	}
	if g := genOf(); g != 1 {
		t.Fatalf("served by generation %d", g)
	}
	// Keep asking while the upgrade runs: the file must never vanish.
	stop := make(chan struct{})
	errs := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				errs <- nil
				return
			default:
			}
			resp, err := client.Get("http://unix/")
			if err != nil {
				errs <- err
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
	p.upgrade(30 * time.Second)
	close(stop)
	if err := <-errs; err != nil {
		t.Fatalf("request during the upgrade: %v", err)
	}
	if g := genOf(); g != 2 {
		t.Fatalf("after the upgrade served by generation %d", g)
	}
	p.signal(syscall.SIGTERM)
	if code := p.wait(30 * time.Second); code != 0 {
		t.Fatalf("master exited %d", code)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket file left after stop (%v)", err)
	}
}

// A unix path where another process listens is refused with EADDRINUSE.
func TestListenUnixInUse(t *testing.T) {
	dir := t.TempDir()
	other, err := net.Listen("unix", filepath.Join(dir, "busy.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	_, report := twMaster(t, 1, "listen unix busy.sock", masterOpts{dir: dir})
	rs := waitReports(t, report, 10*time.Second, "the listen", func(rs []twReport) bool { return len(opsOf(rs, "listen", 1)) == 1 })
	if r := opsOf(rs, "listen", 1)[0]; r.Errno != strconv.Itoa(int(syscall.EADDRINUSE)) {
		t.Fatalf("listen on a busy unix socket: %q errno %q", r.Err, r.Errno)
	}
	if _, err := os.Lstat(filepath.Join(dir, "busy.sock")); err != nil {
		t.Fatalf("the other process's socket file was removed: %v", err)
	}
}

// Row: UDP is one shared socket for all workers.
func TestListenUDPShared(t *testing.T) {
	p, report := twMaster(t, 3, "listenpacket udp 127.0.0.1:0", masterOpts{})
	rs := waitReports(t, report, 10*time.Second, "three udp listens", func(rs []twReport) bool { return len(opsOf(rs, "listenpacket", 1)) == 3 })
	addr := ""
	for _, r := range opsOf(rs, "listenpacket", 1) {
		if r.Err != "" {
			t.Fatal(r.Err)
		}
		if addr == "" {
			addr = r.Addr
		} else if r.Addr != addr {
			t.Fatalf("workers got different udp sockets: %s and %s", addr, r.Addr)
		}
	}
	pids := p.workerPIDs(1)
	for i := 0; i < 20; i++ {
		got := udpAsk(t, addr, "n"+strconv.Itoa(i))
		var pid int
		for _, f := range strings.Fields(got) {
			if v, ok := strings.CutPrefix(f, "pid="); ok {
				pid, _ = strconv.Atoi(v)
			}
		}
		if !slices.Contains(pids, pid) {
			t.Fatalf("answer %q not from a worker %v", got, pids)
		}
	}
}

// Row: a failed bind comes back with the real errno.
func TestListenAddrInUse(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	_, report := twMaster(t, 2, "listen tcp "+busy.Addr().String(), masterOpts{})
	rs := waitReports(t, report, 10*time.Second, "two listens", func(rs []twReport) bool { return len(opsOf(rs, "listen", 1)) == 2 })
	for _, r := range opsOf(rs, "listen", 1) {
		if r.Errno != strconv.Itoa(int(syscall.EADDRINUSE)) || !strings.Contains(r.Err, "address already in use") {
			t.Fatalf("worker %d: err %q errno %q, want EADDRINUSE", r.PID, r.Err, r.Errno)
		}
	}
}

// Rows: Exclusive binds per worker; a listener the worker holds is used
// as-is, without asking the master; a closed listener frees its index.
func TestListenExclusiveOwnAndRelisten(t *testing.T) {
	p, report := twMaster(t, 2, "exclusive tcp 127.0.0.1:0; own tcp 127.0.0.1:0; listen tcp 127.0.0.1:0; relisten tcp 127.0.0.1:0", masterOpts{})
	rs := waitReports(t, report, 10*time.Second, "listens", func(rs []twReport) bool { return len(opsOf(rs, "relisten", 1)) == 2 })
	ex := opsOf(rs, "exclusive", 1)
	if ex[0].Err != "" || ex[1].Err != "" || ex[0].Addr == ex[1].Addr {
		t.Errorf("exclusive listens should give each worker its own socket: %+v", ex)
	}
	own := opsOf(rs, "own", 1)
	if own[0].Addr == own[1].Addr {
		t.Errorf("own listeners collided: %+v", own)
	}
	shared := opsOf(rs, "listen", 1)
	re := opsOf(rs, "relisten", 1)
	for i := range re {
		if re[i].Err != "" || re[i].Addr != shared[0].Addr {
			t.Errorf("relisten after close got %q (%s), want the same socket %s", re[i].Addr, re[i].Err, shared[0].Addr)
		}
	}
	// The master handed out only the one shared socket (once per listen).
	n := p.count(isEvent(events.ListenerHandedOver))
	if n != 4 {
		t.Errorf("master handed out %d listeners, want 4 (2 workers x listen + relisten)", n)
	}
	for _, a := range []string{ex[0].Addr, own[0].Addr, shared[0].Addr} {
		get(t, a)
	}
}

// Row: outside gorolling, the worker package is plain net.
func TestListenStandalone(t *testing.T) {
	report := filepath.Join(t.TempDir(), "r.jsonl")
	cmd := exec.Command(binPath("testworker"))
	cmd.Env = append(os.Environ(), "TW_REPORT="+report,
		"TW_SCRIPT=listen tcp 127.0.0.1:0; listen tcp 127.0.0.1:0; listenpacket udp 127.0.0.1:0")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	rs := waitReports(t, report, 10*time.Second, "three listens", func(rs []twReport) bool {
		return len(opsOf(rs, "listen", 0))+len(opsOf(rs, "listenpacket", 0)) == 3
	})
	ls := opsOf(rs, "listen", 0)
	if ls[0].Err != "" || ls[1].Err != "" || ls[0].Addr == ls[1].Addr {
		t.Fatalf("standalone listens: %+v", ls)
	}
	if f := opsOf(rs, "fds", 0)[0]; f.Gen != 0 || f.Slot != -1 {
		t.Fatalf("standalone identity: slot %d generation %d", f.Slot, f.Gen)
	}
	get(t, ls[0].Addr)
	// SIGTERM drains and exits 0.
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-done:
		done <- err
		if err != nil {
			t.Fatalf("standalone worker after SIGTERM: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("standalone worker did not exit on SIGTERM")
	}
}

// TestWorkerInheritsOnlyItsDescriptors: a worker starts with exactly its
// stdio and the handoff channel, whether a master or its successor started
// it. A leaked descriptor of the master (another worker's channel end, a
// socket) would hide the master's death from that worker or keep a port
// bound after the master is gone.
func TestWorkerInheritsOnlyItsDescriptors(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "pid")
	p, report := twMaster(t, 2, "listen tcp 127.0.0.1:0", masterOpts{args: []string{"--pid-file", pidFile}})
	p.upgrade(30 * time.Second)  // workers spawned while others run
	masterUpgrade(t, p, pidFile) // and by a successor master
	rs := waitReports(t, report, 10*time.Second, "fd reports", func(rs []twReport) bool { return len(opsOf(rs, "fds", 0)) == 6 })
	for _, r := range opsOf(rs, "fds", 0) {
		if !slices.Equal(r.FDs, []int{0, 1, 2, 3}) || r.Env != "3" {
			t.Errorf("worker %d (generation %d) started with fds %v, GOROLLING_FD=%s; want [0 1 2 3] and 3", r.PID, r.Gen, r.FDs, r.Env)
		}
	}
}
