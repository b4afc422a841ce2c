package control

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
)

// TestFindSeveral: with several live sockets and no --name, Find names
// them and points to ls; with one, it picks it; a socket file nobody
// listens on (its master was killed) does not count; --name finds a
// socket in a later search directory (the temp-directory fallback).
func TestFindSeveral(t *testing.T) {
	dir, fallback := t.TempDir(), t.TempDir()
	dirs := []string{dir, fallback}
	if _, err := find("", "", dirs); err == nil || !strings.Contains(err.Error(), "no master found") {
		t.Fatalf("empty directories: %v", err)
	}
	listen := func(path string) *net.UnixListener {
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		return l
	}
	api := listen(filepath.Join(dir, "api.sock"))
	listen(filepath.Join(fallback, "web.sock"))
	dead := listen(filepath.Join(dir, "dead.sock"))
	dead.SetUnlinkOnClose(false)
	dead.Close()
	_, err := find("", "", dirs)
	if err == nil || !strings.Contains(err.Error(), "api, web") || !strings.Contains(err.Error(), "gorolling ls") {
		t.Fatalf("two live sockets and a dead one: %v, want both live names and a pointer to ls", err)
	}
	if p, err := find("", "web", dirs); err != nil || p != filepath.Join(fallback, "web.sock") {
		t.Fatalf("--name web: %s, %v, want the fallback directory's socket", p, err)
	}
	if p, err := find("", "none", dirs); err != nil || p != filepath.Join(dir, "none.sock") {
		t.Fatalf("--name none: %s, %v, want the default directory's path", p, err)
	}
	api.Close()
	if p, err := find("", "", dirs); err != nil || p != filepath.Join(fallback, "web.sock") {
		t.Fatalf("one live socket: %s, %v", p, err)
	}
}
