package registry

import (
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gorolling/gorolling/handoff"
	"github.com/gorolling/gorolling/master/sdnotify"
	"golang.org/x/sys/unix"
)

// restart plays a master's death and systemd's restart: the entries of
// the old registry (which the store kept) come back to a new registry the
// way LISTEN_FDS passes them. The old registry is closed without removing
// files, as a killed master removes nothing.
func restart(t *testing.T, old *Registry, opt Options) (*Registry, []StoreEntry) {
	t.Helper()
	ents, err := old.StoreEntries()
	if err != nil {
		t.Fatal(err)
	}
	old.Close(false)
	r := New(opt)
	t.Cleanup(func() { r.Close(true) })
	for _, e := range ents {
		if !IsStoreName(e.Name) {
			t.Fatalf("store name %q lacks the prefix", e.Name)
		}
		if err := sdnotify.ValidName(e.Name); err != nil {
			t.Fatalf("systemd would refuse the name: %v", err)
		}
		if _, err := r.AdoptStored(Inherited{FD: e.FD, Name: e.Name}); err != nil {
			t.Fatal(err)
		}
	}
	return r, ents
}

// TestStoreKeepsKeysAndPorts: sockets opened for workers come back under
// the same keys (port-0 ones on the same port, reuseport members as
// members, odd unix paths intact), and a worker's request gets the very
// socket, not a new one.
func TestStoreKeepsKeysAndPorts(t *testing.T) {
	dir := t.TempDir()
	odd := filepath.Join(dir, "a:b c%d&e=f;g.sock")
	old := New(Options{ReusePort: true})
	keys := []handoff.Key{
		key(t, "tcp", "127.0.0.1:0", 0),
		key(t, "tcp", "127.0.0.1:0", 1),
		key(t, "udp", "127.0.0.1:0", 0),
		key(t, "unix", odd, 0),
		key(t, "tcp6", "[::1]:0", 0),
	}
	addrs := map[handoff.Key]string{}
	inodes := map[handoff.Key]uint64{}
	for i, k := range keys {
		slot := i // in reuseport mode every TCP request gets its slot's member
		d, s, err := old.Acquire(k, slot)
		if err != nil {
			t.Fatal(err)
		}
		unix.Close(d)
		addrs[s.Key] = s.Addr
		inodes[s.Key] = sockIno(t, s.fd)
	}
	r, ents := restart(t, old, Options{ReusePort: true})
	if len(ents) != len(keys) {
		t.Fatalf("%d entries, want %d", len(ents), len(keys))
	}
	for i, k := range keys {
		slot := i
		d, s, err := r.Acquire(k, slot)
		if err != nil {
			t.Fatal(err)
		}
		if got := sockIno(t, d); got != inodes[s.Key] {
			t.Errorf("%s: a new socket after the restart, not the stored one", s.Key)
		}
		unix.Close(d)
		if s.Addr != addrs[s.Key] {
			t.Errorf("%s: address %s after the restart, %s before", s.Key, s.Addr, addrs[s.Key])
		}
		if !s.fromStore {
			t.Errorf("%s: not marked as from the store", s.Key)
		}
	}
	// The unix socket file is still removed at the final stop, as the
	// registry that created it would have.
	r.Close(true)
	if _, err := net.Dial("unix", odd); err == nil {
		t.Error("the socket still answers after the final stop")
	}
	if exists(odd) {
		t.Errorf("%s survived the final stop", odd)
	}
}

// TestStoreRefusesWhatWouldNotServe: a restarted master does not take
// back a stored socket that would serve nothing or block the binds it
// needs: a unix socket whose file the last master removed (a failed start
// removes its files, and systemd keeps the store for the restart), a
// reuseport member now that --reuseport is off and a plain TCP socket now
// that it is on, a socket bound elsewhere than its name says, and one that
// does not listen. The unix address binds again on request.
func TestStoreRefusesWhatWouldNotServe(t *testing.T) {
	adopt := func(r *Registry, name string, fd int) error {
		_, err := r.AdoptStored(Inherited{FD: fd, Name: name})
		return err
	}
	one := func(old *Registry) StoreEntry {
		t.Helper()
		ents, err := old.StoreEntries()
		if err != nil || len(ents) != 1 {
			t.Fatalf("store entries %v, %v; want one", ents, err)
		}
		return ents[0]
	}

	path := filepath.Join(t.TempDir(), "gone.sock")
	uk := key(t, "unix", path, 0)
	old := New(Options{})
	d, _, err := old.Acquire(uk, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(d)
	e := one(old)
	old.Close(true) // removes the file; the store keeps the socket
	r := New(Options{})
	defer r.Close(true)
	if err := adopt(r, e.Name, e.FD); err == nil || !strings.Contains(err.Error(), "gone") {
		t.Errorf("a unix socket whose file is gone: %v, want refused", err)
	}
	d, s, err := r.Acquire(uk, 0)
	if err != nil {
		t.Fatalf("bind %s again: %v", path, err)
	}
	unix.Close(d)
	if s.fromStore {
		t.Error("the refused socket was served anyway")
	}

	for _, rp := range []bool{true, false} {
		old := New(Options{ReusePort: rp})
		d, _, err := old.Acquire(key(t, "tcp", "127.0.0.1:0", 0), 0)
		if err != nil {
			t.Fatal(err)
		}
		unix.Close(d)
		e := one(old)
		old.Close(false)
		r := New(Options{ReusePort: !rp})
		if err := adopt(r, e.Name, e.FD); err == nil || !strings.Contains(err.Error(), "--reuseport") {
			t.Errorf("stored with --reuseport %v, taken back with it %v: %v, want refused", rp, !rp, err)
		}
		r.Close(true)
	}

	old = New(Options{})
	d, _, err = old.Acquire(key(t, "tcp", "127.0.0.1:0", 0), 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(d)
	e = one(old)
	old.Close(false)
	forged := strings.Replace(e.Name, "127.0.0.1%3A0", "127.0.0.1%3A1", 1)
	if err := adopt(r, forged, e.FD); err == nil || !strings.Contains(err.Error(), "port") {
		t.Errorf("a socket bound elsewhere than its name says: %v, want refused", err)
	}

	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := adopt(r, "gr1;a=127.0.0.1%3A0&k=s&n=tcp4", fd); err == nil {
		t.Error("a socket that does not listen was taken back")
	}
}

// TestStoreListenSpecsReclaimed: --listen sockets come back to the same
// specs (a port-0 spec keeps its port), one whose flag is gone is closed,
// and the LISTEN_FDS order follows the flags as given now.
func TestStoreListenSpecsReclaimed(t *testing.T) {
	old := New(Options{})
	var specs []ListenSpec
	for _, s := range []string{"tcp://127.0.0.1:0?name=a", "tcp://127.0.0.1:0?name=b", "udp://127.0.0.1:0"} {
		ls, err := ParseListenSpec(s)
		if err != nil {
			t.Fatal(err)
		}
		specs = append(specs, ls)
	}
	var before []string
	for _, ls := range specs {
		s, err := old.Preopen(ls)
		if err != nil {
			t.Fatal(err)
		}
		before = append(before, s.Addr)
	}
	r, _ := restart(t, old, Options{})
	// The same first two flags; the udp one was dropped.
	for i, ls := range specs[:2] {
		s, err := r.Preopen(ls)
		if err != nil {
			t.Fatal(err)
		}
		if s.Addr != before[i] {
			t.Errorf("--listen %s: %s after the restart, %s before", ls.Spec, s.Addr, before[i])
		}
		if s.Name != ls.Name {
			t.Errorf("name %q, want %q", s.Name, ls.Name)
		}
	}
	gone := r.ReleaseUnclaimed()
	if len(gone) != 1 || gone[0].Addr != before[2] {
		t.Fatalf("released %v, want the udp socket %s", gone, before[2])
	}
	// Nothing stored is left over, and the store would drop the udp one.
	ents, err := r.StoreEntries()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		unix.Close(e.FD)
	}
	if len(ents) != 2 {
		t.Fatalf("%d entries after the restart, want 2", len(ents))
	}
}

// TestStoreChangedFlagRebinds: the operator changed a --listen flag from
// port 0 to the very port it got before the master died. The stored
// socket of the old flag is let go before the new one binds, or the bind
// would find the port taken.
func TestStoreChangedFlagRebinds(t *testing.T) {
	old := New(Options{})
	ls, err := ParseListenSpec("tcp://127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s, err := old.Preopen(ls)
	if err != nil {
		t.Fatal(err)
	}
	addr := s.Addr
	r, _ := restart(t, old, Options{})
	now, err := ParseListenSpec("tcp://" + addr)
	if err != nil {
		t.Fatal(err)
	}
	if gone := r.ReleaseUnlisted([]ListenSpec{now}); len(gone) != 1 {
		t.Fatalf("released %d stored sockets, want the old flag's", len(gone))
	}
	s, err = r.Preopen(now)
	if err != nil {
		t.Fatalf("--listen %s after the change: %v", now.Spec, err)
	}
	if s.Addr != addr || s.fromStore {
		t.Errorf("got %s (from the store: %v), want a new socket on %s", s.Addr, s.fromStore, addr)
	}
}

// TestStoreSkipsInherited: inherited sockets are not stored; their owner
// passes them again.
func TestStoreSkipsInherited(t *testing.T) {
	r := New(Options{})
	defer r.Close(true)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	f, _ := l.(*net.TCPListener).File()
	fd, _ := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	f.Close()
	if _, err := r.Adopt(Inherited{FD: fd, Number: 7}); err != nil {
		t.Fatal(err)
	}
	ents, err := r.StoreEntries()
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 0 {
		t.Fatalf("inherited socket stored as %q", ents[0].Name)
	}
}

// TestStoreChangedHook: Changed follows every add and collection.
func TestStoreChangedHook(t *testing.T) {
	calls := 0
	r := New(Options{Changed: func() { calls++ }})
	defer r.Close(true)
	k := key(t, "tcp", "127.0.0.1:0", 0)
	d, _, err := r.Acquire(k, -1)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(d)
	if calls != 1 {
		t.Fatalf("%d calls after a new socket, want 1", calls)
	}
	d, _, _ = r.Acquire(k, -1) // the same socket again: no change
	unix.Close(d)
	if calls != 1 {
		t.Fatalf("%d calls after a second request for the same socket, want 1", calls)
	}
	r.Collect(func(handoff.Key) bool { return false })
	if calls != 2 {
		t.Fatalf("%d calls after a collection, want 2", calls)
	}
}

func TestStoreNameRejectsForeign(t *testing.T) {
	r := New(Options{})
	defer r.Close(true)
	for _, name := range []string{"gr1;k=x&n=tcp&a=1", "gr1;k=s&n=fd&a=3", "gr1;k=s&n=tcp", "gr1;k=s&n=tcp&a=x&i=-1", "gr1;%zz"} {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		f, _ := l.(*net.TCPListener).File()
		l.Close()
		fd, _ := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		f.Close()
		if _, err := r.AdoptStored(Inherited{FD: fd, Name: name}); err == nil || !strings.Contains(err.Error(), "fd store socket") {
			t.Errorf("AdoptStored(%q) = %v, want a refusal", name, err)
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil {
			t.Errorf("AdoptStored(%q) left its descriptor open", name)
			unix.Close(fd)
		}
	}
}

func sockIno(t *testing.T, fd int) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func exists(path string) bool {
	var st unix.Stat_t
	return unix.Lstat(path, &st) == nil
}
