package control

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestListenSerialisesStarts: the stale-socket check, its removal and the
// bind run under the lock beside the socket, so two masters starting under
// one name cannot both find the socket stale; the second is told another
// master runs there, naming --name.
func TestListenSerialisesStarts(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ctl")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "app.sock")
	// Another starting master holds the lock.
	unlock, err := lockFile(path + ".lock")
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		s   *Server
		err error
	}
	done := make(chan result, 1)
	go func() {
		s, err := Listen(path, nil)
		done <- result{s, err}
	}()
	select {
	case r := <-done:
		t.Fatalf("Listen did not wait for the lock: %v", r.err)
	case <-time.After(200 * time.Millisecond):
	}
	// It binds meanwhile, then lets go.
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 8); err != nil {
		t.Fatal(err)
	}
	unlock()
	r := <-done
	if r.err == nil {
		r.s.Close(false)
		t.Fatal("a second master took the name of one that runs")
	}
	if !strings.Contains(r.err.Error(), "another master is running") || !strings.Contains(r.err.Error(), "--name") {
		t.Fatalf("error %q: want it to say another master runs and name --name", r.err)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("the running master's socket is gone: %v", err)
	}
}

// TestCloseKeepsAnotherMastersSocket: a master whose socket file was
// replaced (a new master bound the name after this one's stop began)
// leaves the new file alone when it removes its own.
func TestCloseKeepsAnotherMastersSocket(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ctl")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "app.sock")
	s, err := Listen(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Another master's socket now has the name.
	os.Remove(path)
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	s.Close(true)
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("Close removed the other master's socket: %v", err)
	}
	// Its own file it removes.
	os.Remove(path)
	s2, err := Listen(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	s2.Close(true)
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("Close left its own socket file: %v", err)
	}
}
