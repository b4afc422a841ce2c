package control

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestFindSeveral: with several sockets and no --name, Find names them and
// points to ls; with one, it picks it.
func TestFindSeveral(t *testing.T) {
	dir := t.TempDir()
	if _, err := find("", "", dir); err == nil || !strings.Contains(err.Error(), "no master found") {
		t.Fatalf("empty directory: %v", err)
	}
	for _, n := range []string{"api", "web"} {
		if err := os.WriteFile(filepath.Join(dir, n+".sock"), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	_, err := find("", "", dir)
	if err == nil || !strings.Contains(err.Error(), "api, web") || !strings.Contains(err.Error(), "gorolling ls") {
		t.Fatalf("two sockets: %v, want both names and a pointer to ls", err)
	}
	if p, err := find("", "web", dir); err != nil || p != filepath.Join(dir, "web.sock") {
		t.Fatalf("--name web: %s, %v", p, err)
	}
	os.Remove(filepath.Join(dir, "api.sock"))
	if p, err := find("", "", dir); err != nil || p != filepath.Join(dir, "web.sock") {
		t.Fatalf("one socket: %s, %v", p, err)
	}
}
