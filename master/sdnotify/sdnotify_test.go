package sdnotify

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// msg is one datagram the fake service manager received.
type msg struct {
	text string
	fds  []int
}

// manager is the receiving end of $NOTIFY_SOCKET.
type manager struct {
	t  *testing.T
	fd int
}

func newManager(t *testing.T) *manager {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	t.Setenv("NOTIFY_SOCKET", path)
	return &manager{t: t, fd: fd}
}

// next returns the next datagram, or fails the test after a second.
func (m *manager) next() msg {
	m.t.Helper()
	tv := unix.NsecToTimeval(int64(time.Second))
	unix.SetsockoptTimeval(m.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	buf, oob := make([]byte, 4096), make([]byte, unix.CmsgSpace(4*8))
	n, oobn, _, _, err := unix.Recvmsg(m.fd, buf, oob, unix.MSG_CMSG_CLOEXEC)
	if err != nil {
		m.t.Fatalf("no datagram: %v", err)
	}
	out := msg{text: string(buf[:n])}
	cms, _ := unix.ParseSocketControlMessage(oob[:oobn])
	for _, c := range cms {
		if fds, err := unix.ParseUnixRights(&c); err == nil {
			out.fds = append(out.fds, fds...)
		}
	}
	m.t.Cleanup(func() {
		for _, fd := range out.fds {
			unix.Close(fd)
		}
	})
	return out
}

// none checks that nothing more arrived.
func (m *manager) none() {
	m.t.Helper()
	buf := make([]byte, 4096)
	if n, _, err := unix.Recvfrom(m.fd, buf, unix.MSG_DONTWAIT); err == nil {
		m.t.Fatalf("unexpected datagram %q", buf[:n])
	}
}

func sameFile(t *testing.T, a, b int) bool {
	t.Helper()
	x, err1 := identify(a)
	y, err2 := identify(b)
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	return x == y
}

func pipe(t *testing.T) int {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
	return p[0]
}

func TestSyncSendsOnlyChanges(t *testing.T) {
	m := newManager(t)
	st, err := NewStore(FromEnv(), 0)
	if err != nil {
		t.Fatal(err)
	}
	a, b, c := pipe(t), pipe(t), pipe(t)
	added, removed, err := st.Sync([]Entry{{"a", a}, {"b", b}})
	if err != nil || added != 2 || removed != 0 {
		t.Fatalf("Sync = %d, %d, %v; want 2 added", added, removed, err)
	}
	for _, want := range []struct {
		name string
		fd   int
	}{{"a", a}, {"b", b}} {
		got := m.next()
		if got.text != "FDSTORE=1\nFDNAME="+want.name || len(got.fds) != 1 || !sameFile(t, got.fds[0], want.fd) {
			t.Fatalf("got %q with %d fds, want FDSTORE of %s", got.text, len(got.fds), want.name)
		}
	}
	// The same set again: nothing to say.
	if added, removed, err := st.Sync([]Entry{{"a", a}, {"b", b}}); err != nil || added+removed != 0 {
		t.Fatalf("second Sync = %d, %d, %v; want nothing", added, removed, err)
	}
	m.none()
	// b gone, a under the same name for another file, c new.
	added, removed, err = st.Sync([]Entry{{"a", c}})
	if err != nil || added != 1 || removed != 2 {
		t.Fatalf("third Sync = %d, %d, %v; want 1 added, 2 removed", added, removed, err)
	}
	for _, want := range []string{"FDSTOREREMOVE=1\nFDNAME=b", "FDSTOREREMOVE=1\nFDNAME=a", "FDSTORE=1\nFDNAME=a"} {
		if got := m.next(); got.text != want {
			t.Fatalf("got %q, want %q", got.text, want)
		}
	}
}

// TestSealHandsTheStoreOver: a master that exports its state for a
// successor stores nothing more, the successor learns what the store holds
// and removes what it does not want, and a failed upgrade gives the store
// back. A final stop empties it, blobs too.
func TestSealHandsTheStoreOver(t *testing.T) {
	m := newManager(t)
	old, _ := NewStore(FromEnv(), 0)
	a, b, c := pipe(t), pipe(t), pipe(t)
	if _, _, err := old.Sync([]Entry{{"a", a}, {"b", b}}); err != nil {
		t.Fatal(err)
	}
	m.next()
	m.next()
	held := old.Seal()
	if len(held) != 2 || held[0].Name != "a" || held[1].Name != "b" {
		t.Fatalf("Seal = %v, want a and b", held)
	}
	// Sealed: the old master's workers open c; nothing is sent.
	if added, removed, err := old.Sync([]Entry{{"a", a}, {"b", b}, {"c", c}}); added+removed != 0 || err != nil {
		t.Fatalf("sealed Sync = %d, %d, %v; want nothing", added, removed, err)
	}
	if err := old.PutBlob("state", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	m.none()

	// The successor wants a (the same socket) and not b.
	succ, _ := NewStore(FromEnv(), 0)
	succ.AssumeHeld(append(held, Held{Name: "bad:name"}))
	if n := succ.Count(); n != 2 {
		t.Fatalf("the successor counts %d entries, want 2", n)
	}
	if added, removed, err := succ.Sync([]Entry{{"a", a}}); added != 0 || removed != 1 || err != nil {
		t.Fatalf("successor Sync = %d, %d, %v; want b removed", added, removed, err)
	}
	if got := m.next(); got.text != "FDSTOREREMOVE=1\nFDNAME=b" {
		t.Fatalf("got %q, want b removed", got.text)
	}
	m.none()

	// A failed upgrade: the old master keeps the store again.
	old.Unseal()
	if added, _, err := old.Sync([]Entry{{"a", a}, {"b", b}, {"c", c}}); added != 1 || err != nil {
		t.Fatalf("unsealed Sync = %d, %v; want c added", added, err)
	}
	if got := m.next(); got.text != "FDSTORE=1\nFDNAME=c" {
		t.Fatalf("got %q, want c stored", got.text)
	}

	// The final stop: everything goes, the blob included, and nothing
	// is stored after it.
	if err := old.PutBlob("state", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	m.next()
	m.next()
	if err := old.Clear(); err != nil {
		t.Fatal(err)
	}
	var removed []string
	for range 4 {
		removed = append(removed, strings.TrimPrefix(m.next().text, "FDSTOREREMOVE=1\nFDNAME="))
	}
	if strings.Join(removed, ",") != "a,b,c,state" {
		t.Fatalf("Clear removed %v, want a, b, c and state", removed)
	}
	if added, _, _ := old.Sync([]Entry{{"a", a}}); added != 0 {
		t.Fatal("a Sync after Clear stored something")
	}
	m.none()
}

func TestSyncAssumedAndFull(t *testing.T) {
	m := newManager(t)
	st, _ := NewStore(FromEnv(), 2)
	a, b, c := pipe(t), pipe(t), pipe(t)
	st.Assume("a", a) // came back from the store: not sent again
	added, _, err := st.Sync([]Entry{{"a", a}, {"b", b}, {"c", c}})
	if added != 1 {
		t.Fatalf("added %d, want 1 (a is held, c does not fit)", added)
	}
	if err == nil || !strings.Contains(err.Error(), "FileDescriptorStoreMax=2") {
		t.Fatalf("err = %v, want the store-full error", err)
	}
	if got := m.next(); got.text != "FDSTORE=1\nFDNAME=b" {
		t.Fatalf("got %q", got.text)
	}
	m.none()
	// Reported once only.
	if _, _, err := st.Sync([]Entry{{"a", a}, {"b", b}, {"c", c}}); err != nil {
		t.Fatalf("second Sync: %v", err)
	}
}

func TestSyncRefusesBadNames(t *testing.T) {
	newManager(t)
	st, _ := NewStore(FromEnv(), 0)
	a := pipe(t)
	for _, name := range []string{"", "a:b", "tab\there", strings.Repeat("x", 256), "caf\xc3\xa9"} {
		if _, _, err := st.Sync([]Entry{{name, a}}); err == nil {
			t.Errorf("Sync accepted the name %q", name)
		}
	}
}

func TestBlobIsRewrittenInPlace(t *testing.T) {
	m := newManager(t)
	st, _ := NewStore(FromEnv(), 0)
	if err := st.PutBlob("state", []byte(`{"workers":12}`)); err != nil {
		t.Fatal(err)
	}
	if got := m.next(); got.text != "FDSTOREREMOVE=1\nFDNAME=state" {
		t.Fatalf("got %q, want the predecessor's copy removed first", got.text)
	}
	stored := m.next()
	if stored.text != "FDSTORE=1\nFDNAME=state" || len(stored.fds) != 1 {
		t.Fatalf("got %q with %d fds", stored.text, len(stored.fds))
	}
	if err := st.PutBlob("state", []byte(`{"workers":3}`)); err != nil {
		t.Fatal(err)
	}
	m.none() // in place: nothing sent
	b, err := ReadBlob(stored.fds[0])
	if err != nil || string(b) != `{"workers":3}` {
		t.Fatalf("the manager's copy reads %q, %v", b, err)
	}
	// Sync leaves blobs alone.
	if _, removed, _ := st.Sync(nil); removed != 0 {
		t.Fatalf("Sync removed %d; the blob must stay", removed)
	}
	m.none()
}

func TestWatchdogTakesOverFromPredecessor(t *testing.T) {
	t.Setenv("WATCHDOG_USEC", "4000000")
	t.Setenv("WATCHDOG_PID", "12345")
	if d, err := Watchdog(0); err != nil || d != 0 {
		t.Fatalf("another process's watchdog: got %v, %v; want 0", d, err)
	}
	if d, err := Watchdog(12345); err != nil || d != 4*time.Second {
		t.Fatalf("the predecessor's watchdog: got %v, %v; want 4s", d, err)
	}
	if got := os.Getenv("WATCHDOG_PID"); got != strconv.Itoa(os.Getpid()) {
		t.Fatalf("WATCHDOG_PID = %s, want this process (%d) for its own successor", got, os.Getpid())
	}
	t.Setenv("WATCHDOG_USEC", "")
	if d, _ := Watchdog(0); d != 0 {
		t.Fatalf("no WATCHDOG_USEC: got %v", d)
	}
}

func TestNilNotifier(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	n := FromEnv()
	if n != nil {
		t.Fatal("FromEnv without NOTIFY_SOCKET is not nil")
	}
	if err := n.Notify("READY=1"); err != nil {
		t.Fatal(err)
	}
	if _, err := NewStore(n, 0); err == nil {
		t.Fatal("NewStore without a notify socket succeeded")
	}
}
