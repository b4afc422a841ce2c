package account

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/gorolling/gorolling/master/procfs"
	"golang.org/x/sys/unix"
)

// nobody returns the account "nobody" for tests; it fails the test (under
// GOROLLING_CI) or skips it unless it runs as root.
func nobody(t *testing.T) *Account {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("GOROLLING_CI") != "" {
			t.Fatal("CI must run the tests as root")
		}
		t.Skip("needs root")
	}
	a, err := Lookup("nobody", "")
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
	if err := RunAs(a, 0o027, func() error {
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
	if m := procfs.Umask(); m == 0o027 {
		t.Fatal("runAs changed the process's umask")
	}
	if d, _ := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0); d != 1 {
		t.Errorf("the process is left non-dumpable (%d)", d)
	}
	wantErr := errors.New("x")
	if err := RunAs(a, 0o022, func() error { return wantErr }); err != wantErr {
		t.Fatalf("runAs returned %v, want fn's error", err)
	}
	if err := RunAs(a, 0o022, func() error { panic("boom") }); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("a panic in fn: %v", err)
	}
}
