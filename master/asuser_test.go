package master

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/gorolling/gorolling/handoff"
	"golang.org/x/sys/unix"
)

func nobody(t *testing.T) *Account {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("GOROLLING_CI") != "" {
			t.Fatal("CI must run the tests as root")
		}
		t.Skip("needs root")
	}
	a, err := LookupAccount("nobody", "")
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// threadUIDs returns the Uid line (real, effective, saved, fs) of every
// thread of this process.
func threadUIDs(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		b, err := os.ReadFile("/proc/self/task/" + e.Name() + "/status")
		if err != nil {
			continue // the thread ended meanwhile
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "Uid:"); ok {
				out = append(out, strings.Join(strings.Fields(v), " "))
			}
		}
	}
	return out
}

// TestRunAs: fn runs with the account's effective ids and the given umask,
// and afterwards no thread of the process carries them.
func TestRunAs(t *testing.T) {
	a := nobody(t)
	var euid, egid, mask int
	var ruid int
	if err := runAs(a, 0o027, func() error {
		ruid, euid, egid = unix.Getuid(), unix.Geteuid(), unix.Getegid()
		mask = unix.Umask(0o027)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if euid != int(a.UID) || egid != int(a.GID) || ruid != 0 || mask != 0o027 {
		t.Fatalf("in runAs: ruid %d euid %d egid %d umask %o; want 0, %d, %d, 027", ruid, euid, egid, mask, a.UID, a.GID)
	}
	for _, ids := range threadUIDs(t) {
		if ids != "0 0 0 0" {
			t.Fatalf("a thread still runs with uids %q after runAs", ids)
		}
	}
	if m := processUmask(); m == 0o027 {
		t.Fatal("runAs changed the process's umask")
	}
	if d, _ := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0); d != 1 {
		t.Errorf("the process is left non-dumpable (%d)", d)
	}
	wantErr := errors.New("x")
	if err := runAs(a, 0o022, func() error { return wantErr }); err != wantErr {
		t.Fatalf("runAs returned %v, want fn's error", err)
	}
	if err := runAs(a, 0o022, func() error { panic("boom") }); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("a panic in fn: %v", err)
	}
}

// TestRegistryOpensAsWorkers: a socket opened for workers of another
// account is theirs from birth, a directory they may not enter refuses
// them with EACCES naming --listen, a privileged port too, and the file is
// removed with their rights when the socket is collected.
func TestRegistryOpensAsWorkers(t *testing.T) {
	a := nobody(t)
	r := newRegistry(a)
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
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket file left after collection: %v", err)
	}
}

// TestPreopenChownsWithoutFollowing: a --listen unix socket is born with
// its mode and given to the workers' account; a socket file that is not
// the one just bound (a hard link, here) is refused.
func TestPreopenChownsWithoutFollowing(t *testing.T) {
	a := nobody(t)
	r := newRegistry(a)
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
	if _, err := chownSocketFile(link, a); err == nil {
		t.Fatal("chownSocketFile gave away a socket file with two links")
	}
	if err := unix.Lstat(other, &st); err != nil || st.Uid != 0 {
		t.Fatalf("the linked file changed owner: %d %v", st.Uid, err)
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
