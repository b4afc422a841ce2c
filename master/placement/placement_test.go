package placement

import (
	"errors"
	"net"
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// members opens n listening TCP sockets on one loopback port, all with
// SO_REUSEPORT, and returns their descriptors and the port. Cleanup closes
// those still open (a test that closes one sets it to -1 in the slice).
func members(t *testing.T, n int) ([]int, int) {
	t.Helper()
	fds := make([]int, 0, n)
	t.Cleanup(func() {
		for _, fd := range fds {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
	})
	port := 0
	for i := 0; i < n; i++ {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			t.Fatal(err)
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			t.Fatal(err)
		}
		if err := unix.Listen(fd, 256); err != nil {
			t.Fatal(err)
		}
		if port == 0 {
			sa, _ := unix.Getsockname(fd)
			port = sa.(*unix.SockaddrInet4).Port
		}
		fds = append(fds, fd)
	}
	return fds, port
}

// spread makes k connections to port and returns how many each socket of
// fds accepted.
func spread(t *testing.T, fds []int, port, k int) []int {
	t.Helper()
	var conns []net.Conn
	for i := 0; i < k; i++ {
		c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	got := make([]int, len(fds))
	for i, fd := range fds {
		for {
			nfd, _, err := unix.Accept4(fd, unix.SOCK_CLOEXEC)
			if err != nil {
				break
			}
			unix.Close(nfd)
			got[i]++
		}
	}
	return got
}

// active returns the members of fds (slot = index), those in on active.
func active(fds []int, on ...int) map[string][]Member {
	var ms []Member
	for i, fd := range fds {
		if fd < 0 {
			continue
		}
		a := false
		for _, x := range on {
			a = a || x == i
		}
		ms = append(ms, Member{Slot: i, FD: fd, Active: a})
	}
	return map[string][]Member{"g": ms}
}

func newPlacer(t *testing.T, fds []int) *Placer {
	t.Helper()
	p := New()
	t.Cleanup(p.Close)
	all := make([]int, len(fds))
	for i := range all {
		all[i] = i
	}
	if err := p.Sync(active(fds, all...)); err != nil {
		if errors.Is(err, ErrUnavailable) && os.Getenv("GOROLLING_CI") == "" {
			t.Skipf("BPF is not available here (CI requires it): %v", err)
		}
		t.Fatal(err)
	}
	return p
}

// TestRoundRobin: connections go to the active members in turn, and
// changing which are active (fewer, more) keeps it so.
func TestRoundRobin(t *testing.T) {
	fds, port := members(t, 3)
	p := newPlacer(t, fds)
	if got := spread(t, fds, port, 30); got[0] != 10 || got[1] != 10 || got[2] != 10 {
		t.Fatalf("30 connections over 3 members: %v, want 10 each", got)
	}
	// Slot 1 has no ready worker: it gets nothing.
	if err := p.Sync(active(fds, 0, 2)); err != nil {
		t.Fatal(err)
	}
	if got := spread(t, fds, port, 30); got[0] != 15 || got[1] != 0 || got[2] != 15 {
		t.Fatalf("30 connections over members 0 and 2: %v, want 15, 0, 15", got)
	}
	// Back: every member active again.
	if err := p.Sync(active(fds, 2, 1, 0)); err != nil {
		t.Fatal(err)
	}
	if got := spread(t, fds, port, 30); got[0] != 10 || got[1] != 10 || got[2] != 10 {
		t.Fatalf("30 connections over 3 reordered members: %v, want 10 each", got)
	}
}

// TestClosedMember: a member that closes leaves the map; until the next
// Update its index selects nothing and the kernel's hash picks among the
// others, so no connection is refused; after it, the rest share evenly.
func TestClosedMember(t *testing.T) {
	fds, port := members(t, 3)
	p := newPlacer(t, fds)
	unix.Close(fds[1])
	fds[1] = -1
	rest := []int{fds[0], fds[2]}
	got := spread(t, rest, port, 30)
	if got[0]+got[1] != 30 {
		t.Fatalf("30 connections, %d accepted by the remaining members", got[0]+got[1])
	}
	if err := p.Sync(active(fds, 0, 2)); err != nil {
		t.Fatal(err)
	}
	if got := spread(t, rest, port, 30); got[0] != 15 || got[1] != 15 {
		t.Fatalf("30 connections over 2 members: %v, want 15 each", got)
	}
	// A group no longer named is forgotten; its sockets keep the program.
	if err := p.Sync(map[string][]Member{}); err != nil {
		t.Fatal(err)
	}
	if len(p.groups) != 0 {
		t.Fatalf("%d groups kept", len(p.groups))
	}
}

// TestGroupBound: past MaxGroups, further groups are not steered (and cost
// no descriptor); a group that goes away makes room.
func TestGroupBound(t *testing.T) {
	fds, _ := members(t, 1)
	p := newPlacer(t, fds)
	in := map[string][]Member{"g": {{Slot: 0, FD: fds[0], Active: true}}}
	for i := 0; i < MaxGroups+10; i++ {
		f, _ := members(t, 1)
		in["g"+strconv.Itoa(i)] = []Member{{Slot: 0, FD: f[0], Active: true}}
	}
	if err := p.Sync(in); err != nil {
		t.Fatal(err)
	}
	if len(p.groups) != MaxGroups {
		t.Fatalf("%d groups steered, want %d", len(p.groups), MaxGroups)
	}
	delete(in, "g")
	if err := p.Sync(in); err != nil {
		t.Fatal(err)
	}
	if len(p.groups) != MaxGroups {
		t.Fatalf("after one group went: %d groups steered, want %d (a waiting one takes its place)", len(p.groups), MaxGroups)
	}
}
