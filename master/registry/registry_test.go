package registry

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/gorolling/gorolling/handoff"
	"github.com/gorolling/gorolling/master/account"
	"golang.org/x/sys/unix"
)

func key(t *testing.T, network, addr string, index int) handoff.Key {
	t.Helper()
	packet := network == "udp" || network == "unixgram"
	k, err := handoff.Normalize(&handoff.ListenRequest{Network: network, Address: addr, Index: index, Packet: packet})
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func nonblocking(t *testing.T, fd int) bool {
	t.Helper()
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fl&unix.O_NONBLOCK != 0
}

func cloexec(t *testing.T, fd int) bool {
	t.Helper()
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fl&unix.FD_CLOEXEC != 0
}

// TestRegistrySharesPort0: the k-th port-0 request of every worker gets
// the same socket while anyone holds it; once nobody does, the socket is
// closed and its port forgotten.
func TestRegistrySharesPort0(t *testing.T) {
	r := New(Options{})
	defer r.Close(true)
	k0 := key(t, "tcp", "127.0.0.1:0", 0)
	k1 := key(t, "tcp", "127.0.0.1:0", 1)
	d1, s1, err := r.Acquire(k0, 0)
	if err != nil {
		t.Fatal(err)
	}
	d2, s2, err := r.Acquire(k0, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, s3, err := r.Acquire(k1, 0)
	if err != nil {
		t.Fatal(err)
	}
	if s1 != s2 || s1.Addr == s3.Addr {
		t.Fatalf("index 0 twice: %s %s; index 1: %s", s1.Addr, s2.Addr, s3.Addr)
	}
	for _, fd := range []int{d1, d2, s1.fd} {
		if !cloexec(t, fd) || !nonblocking(t, fd) {
			t.Fatalf("fd %d: cloexec %v nonblocking %v", fd, cloexec(t, fd), nonblocking(t, fd))
		}
	}
	unix.Close(d1)
	unix.Close(d2)
	// Nobody holds index 0 any more: it is closed.
	gone := r.Collect(func(k handoff.Key) bool { return k == k1 })
	if len(gone) != 1 || gone[0] != s1 {
		t.Fatalf("collected %v", gone)
	}
	d, s, err := r.Acquire(k0, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(d)
	if s.Addr == "" {
		t.Fatal("no address")
	}
	// The collected socket's port assignment is forgotten: a worker asking
	// for ever new addresses cannot grow the registry.
	r.mu.Lock()
	n := len(r.ports)
	r.mu.Unlock()
	if n != 2 {
		t.Fatalf("%d port assignments for 2 live port-0 keys", n)
	}
	r.Collect(func(handoff.Key) bool { return false })
	r.mu.Lock()
	n = len(r.ports)
	r.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d port assignments kept for no socket", n)
	}
}

func TestRegistryErrno(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	r := New(Options{})
	defer r.Close(true)
	_, _, err = r.Acquire(key(t, "tcp", busy.Addr().String(), 0), 0)
	if !errors.Is(err, syscall.EADDRINUSE) || handoff.ErrnoName(err) != "EADDRINUSE" {
		t.Fatalf("err %v", err)
	}
	_, _, err = r.Acquire(handoff.Key{Network: "fd", Address: "77"}, 0)
	if !errors.Is(err, syscall.EBADF) {
		t.Fatalf("unknown fd: %v", err)
	}
}

func TestRegistryUnixLifetime(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s.sock")
	// A stale file from a dead process is replaced.
	stale, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()

	r := New(Options{})
	d, _, err := r.Acquire(key(t, "unix", path, 0), 0)
	if err != nil {
		t.Fatal(err)
	}
	// A worker closing its copy does not unlink the path.
	unix.Close(d)
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("socket unusable after a copy closed: %v", err)
	}
	c.Close()
	// A live socket at a path is refused.
	other := New(Options{})
	if _, _, err := other.Acquire(key(t, "unix", path, 0), 0); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("second bind on a live socket: %v", err)
	}
	other.Close(true)
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("a failed registry removed someone else's socket: %v", err)
	}
	// Close without removal keeps the file (a successor takes over) ...
	r2 := New(Options{})
	gpath := filepath.Join(dir, "g.sock")
	if d, _, err := r2.Acquire(key(t, "unixgram", gpath, 0), 0); err != nil {
		t.Fatal(err)
	} else {
		unix.Close(d)
	}
	r2.Close(false)
	if _, err := os.Stat(gpath); err != nil {
		t.Fatal("Close(false) removed the file")
	}
	// ... and the final stop removes it.
	r.Close(true)
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("Close(true) left %s", path)
	}
}

func TestRegistryAdopt(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var fd int
	rc, _ := l.(*net.TCPListener).SyscallConn()
	rc.Control(func(x uintptr) { fd, _ = unix.FcntlInt(x, unix.F_DUPFD, 0) })
	u, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	var ufd int
	rc, _ = u.(*net.UDPConn).SyscallConn()
	rc.Control(func(x uintptr) { ufd, _ = unix.FcntlInt(x, unix.F_DUPFD, 0) })

	r := New(Options{})
	defer r.Close(true)
	s, err := r.Adopt(Inherited{FD: fd, Number: fd, Name: "http"})
	if err != nil {
		t.Fatal(err)
	}
	if s.Addr != l.Addr().String() || s.Network != "tcp" || !cloexec(t, fd) || s.Kind() != "inherited" {
		t.Fatalf("adopted %+v", s)
	}
	if _, err := r.Adopt(Inherited{FD: ufd, Number: ufd}); err != nil {
		t.Fatal(err)
	}
	fdKey := func(n int, packet bool) handoff.Key {
		k, _ := handoff.Normalize(&handoff.ListenRequest{FD: &n, Packet: packet})
		return k
	}
	if d, _, err := r.Acquire(fdKey(fd, false), 0); err != nil {
		t.Fatal(err)
	} else {
		unix.Close(d)
	}
	if _, _, err := r.Acquire(fdKey(fd, true), 0); !errors.Is(err, syscall.EPROTOTYPE) {
		t.Fatalf("stream fd as packet: %v", err)
	}
	if d, _, err := r.Acquire(fdKey(ufd, true), 0); err != nil {
		t.Fatal(err)
	} else {
		unix.Close(d)
	}
	// Inherited sockets are never collected.
	if gone := r.Collect(func(handoff.Key) bool { return false }); len(gone) != 0 {
		t.Fatalf("collected inherited sockets: %v", gone)
	}
}

func TestRegistryReusePortGroup(t *testing.T) {
	r := New(Options{ReusePort: true})
	defer r.Close(true)
	k := key(t, "tcp", "127.0.0.1:0", 0)
	var addrs []string
	var members []*Socket
	for slot := 0; slot < 3; slot++ {
		d, s, err := r.Acquire(k, slot)
		if err != nil {
			t.Fatal(err)
		}
		unix.Close(d)
		if s.Key.Member != slot+1 {
			t.Fatalf("slot %d got member %d", slot, s.Key.Member)
		}
		addrs = append(addrs, s.Addr)
		members = append(members, s)
	}
	if addrs[0] != addrs[1] || addrs[1] != addrs[2] {
		t.Fatalf("members on different ports: %v", addrs)
	}
	if members[0] == members[1] {
		t.Fatal("two slots share one socket in reuseport mode")
	}
	// A slot's successor gets the same socket.
	d, s, err := r.Acquire(k, 1)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(d)
	if s != members[1] {
		t.Fatal("slot 1's successor got another socket")
	}
	// UDP stays shared.
	u := key(t, "udp", "127.0.0.1:0", 0)
	da, a, _ := r.Acquire(u, 0)
	db, b, _ := r.Acquire(u, 1)
	unix.Close(da)
	unix.Close(db)
	if a != b {
		t.Fatal("udp split into members")
	}
}

// TestRegistryReusePortConcurrentPort0: the first workers of a generation
// ask at the same moment; every slot's member must still land on one port,
// or the slots that got their own port are unreachable on the address the
// others serve.
func TestRegistryReusePortConcurrentPort0(t *testing.T) {
	for round := 0; round < 50; round++ {
		r := New(Options{ReusePort: true})
		k := key(t, "tcp", "127.0.0.1:0", 0)
		const slots = 4
		addrs := make([]string, slots)
		errs := make([]error, slots)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for slot := 0; slot < slots; slot++ {
			wg.Add(1)
			go func(slot int) {
				defer wg.Done()
				<-start
				d, s, err := r.Acquire(k, slot)
				if err != nil {
					errs[slot] = err
					return
				}
				unix.Close(d)
				addrs[slot] = s.Addr
			}(slot)
		}
		close(start)
		wg.Wait()
		r.Close(true)
		for slot := 0; slot < slots; slot++ {
			if errs[slot] != nil {
				t.Fatalf("round %d slot %d: %v", round, slot, errs[slot])
			}
			if addrs[slot] != addrs[0] {
				t.Fatalf("round %d: members on different ports: %v", round, addrs)
			}
		}
	}
}

// TestRegistryOpensAsWorkers: a socket opened for workers of another
// account is theirs from birth, a directory they may not enter refuses
// them with EACCES naming --listen, a privileged port too, and the file is
// removed with their rights when the socket is collected.
func TestRegistryOpensAsWorkers(t *testing.T) {
	a := nobody(t)
	r := New(Options{Owner: a})
	defer r.Close(true)
	dir := t.TempDir()
	os.Chmod(dir, 0o777)
	for d := filepath.Dir(dir); d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	sock := filepath.Join(dir, "w.sock")
	k := key(t, "unix", sock, 0)
	fd, s, err := r.Acquire(k, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Lstat(sock, &st); err != nil || st.Uid != a.UID || st.Gid != a.GID {
		t.Fatalf("socket file owned by %d:%d (%v), want %d:%d", st.Uid, st.Gid, err, a.UID, a.GID)
	}
	if s.owner != a {
		t.Fatal("the socket does not remember whose file it made")
	}

	private := filepath.Join(t.TempDir(), "private")
	os.Mkdir(private, 0o700)
	_, _, err = r.Acquire(key(t, "unix", filepath.Join(private, "x.sock"), 0), 0)
	if !errors.Is(err, unix.EACCES) || !strings.Contains(err.Error(), "--listen") {
		t.Fatalf("a socket in a directory nobody may not write: %v", err)
	}
	_, _, err = r.Acquire(key(t, "tcp", "127.0.0.1:"+strconv.Itoa(privatePort(t)), 0), 0)
	if !errors.Is(err, unix.EACCES) || !strings.Contains(err.Error(), "--listen") {
		t.Fatalf("a privileged port: %v", err)
	}

	gone := r.Collect(func(handoff.Key) bool { return false })
	if len(gone) != 1 {
		t.Fatalf("collected %d sockets", len(gone))
	}
	r.removing.Wait()
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket file left after collection: %v", err)
	}
}

// TestPreopenChownsWithoutFollowing: a --listen unix socket is born with
// its mode and given to the workers' account; a socket file that is not
// the one just bound (a hard link, here) is refused.
func TestPreopenChownsWithoutFollowing(t *testing.T) {
	a := nobody(t)
	r := New(Options{Owner: a})
	defer r.Close(true)
	dir := t.TempDir()
	ls, err := ParseListenSpec("unix://" + filepath.Join(dir, "api.sock") + "?mode=0660")
	if err != nil {
		t.Fatal(err)
	}
	s, err := r.Preopen(ls)
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(s.path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&0o777 != 0o660 || st.Uid != a.UID {
		t.Fatalf("--listen socket: mode %o owner %d, want 0660 and %d", st.Mode&0o777, st.Uid, a.UID)
	}
	// A client checking who serves it sees the workers' account, who do:
	// not root, who only bound it.
	c, err := net.Dial("unix", s.path)
	if err != nil {
		t.Fatal(err)
	}
	rc, _ := c.(*net.UnixConn).SyscallConn()
	var cred *unix.Ucred
	rc.Control(func(fd uintptr) { cred, _ = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	c.Close()
	if cred == nil || cred.Uid != a.UID {
		t.Fatalf("the --listen socket's peer credentials say uid %v, want the workers' %d", cred, a.UID)
	}
	other := filepath.Join(dir, "other.sock")
	l, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(l)
	if err := unix.Bind(l, &unix.SockaddrUnix{Name: other}); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.sock")
	if err := os.Link(other, link); err != nil {
		t.Fatal(err)
	}
	var lst unix.Stat_t
	unix.Lstat(link, &lst)
	dfd, err := account.OpenDirNoFollow(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dfd)
	if err := chownSocketFile(dfd, "link.sock", lst.Ino, a); err == nil {
		t.Fatal("chownSocketFile gave away a socket file with two links")
	}
	if err := unix.Lstat(other, &st); err != nil || st.Uid != 0 {
		t.Fatalf("the linked file changed owner: %d %v", st.Uid, err)
	}
	// A --listen path through a symlink is refused: root never follows one.
	real := t.TempDir()
	sym := filepath.Join(dir, "sym")
	if err := os.Symlink(real, sym); err != nil {
		t.Fatal(err)
	}
	ls, _ = ParseListenSpec("unix://" + filepath.Join(sym, "x.sock"))
	if _, err := r.Preopen(ls); err == nil || !strings.Contains(err.Error(), "symlink") || !strings.Contains(err.Error(), real) {
		t.Fatalf("--listen through a symlink: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(real, "x.sock")); !os.IsNotExist(err) {
		t.Fatalf("a socket was bound behind the symlink: %v", err)
	}
}

// privatePort returns a free port below 1024 on 127.0.0.1.
func privatePort(t *testing.T) int {
	t.Helper()
	for p := 900; p < 1024; p++ {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		err = unix.Bind(fd, &unix.SockaddrInet4{Port: p, Addr: [4]byte{127, 0, 0, 1}})
		unix.Close(fd)
		if err == nil {
			return p
		}
	}
	t.Fatal("no free privileged port")
	return 0
}

// nobody returns the account "nobody"; it fails the test (under
// GOROLLING_CI) or skips it unless it runs as root.
func nobody(t *testing.T) *account.Account {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("GOROLLING_CI") != "" {
			t.Fatal("CI must run the tests as root")
		}
		t.Skip("needs root")
	}
	a, err := account.Lookup("nobody", "")
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestRegistryMaxUnderConcurrentOpens: workers asking at once for new
// sockets cannot take the registry past Max, though the lock is let go
// while each socket is opened.
func TestRegistryMaxUnderConcurrentOpens(t *testing.T) {
	const max, asks = 4, 64
	r := New(Options{Max: max})
	defer r.Close(true)
	var wg sync.WaitGroup
	var mu sync.Mutex
	got := 0
	for i := 0; i < asks; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d, _, err := r.Acquire(key(t, "tcp", "127.0.0.1:0", i), 0)
			if err != nil {
				return
			}
			unix.Close(d)
			mu.Lock()
			got++
			mu.Unlock()
		}()
	}
	wg.Wait()
	if got > max {
		t.Fatalf("%d sockets opened at once, past Max %d", got, max)
	}
}
