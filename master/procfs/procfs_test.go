package procfs

import (
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"
)

func TestReadStat(t *testing.T) {
	st, err := ReadStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if st.PPid != os.Getppid() || st.State == 'Z' || st.State == 0 {
		t.Fatalf("stat of self: %+v, want ppid %d", st, os.Getppid())
	}
	if !Running(os.Getpid()) {
		t.Fatal("this process does not run")
	}
	// A child started after this process has a later start time.
	child := exec.Command("sleep", "1")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	cst, err := ReadStat(child.Process.Pid)
	child.Process.Kill()
	child.Wait()
	if err != nil || st.Start == 0 || cst.Start < st.Start {
		t.Fatalf("start times: self %d, child %d (%v); want a nonzero self and a child no earlier", st.Start, cst.Start, err)
	}
	// Spin: the counter must move (by clock ticks), however busy the
	// machine is, within 5 s of wall time.
	end := time.Now().Add(5 * time.Second)
	moved := time.Duration(0)
	for moved < 50*time.Millisecond && time.Now().Before(end) {
		for i := 0; i < 1e6; i++ {
		}
		after, err := ReadStat(os.Getpid())
		if err != nil {
			t.Fatal(err)
		}
		moved = after.CPU - st.CPU
	}
	if moved < 50*time.Millisecond {
		t.Fatalf("5 s of spinning moved the CPU time by %s", moved)
	}
}

// TestZombieIsNotRunning: an exited child that is not reaped yet is a
// zombie, and Running says no; once reaped it is gone.
func TestZombieIsNotRunning(t *testing.T) {
	cmd := exec.Command("/bin/sh", "-c", "exit 0")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	for i := 0; i < 1000; i++ {
		if st, err := ReadStat(pid); err == nil && st.State == 'Z' {
			break
		}
		exec.Command("true").Run() // let time pass without sleeping blind
	}
	if Running(pid) {
		t.Errorf("a zombie counts as running")
	}
	cmd.Wait()
	if _, err := ReadStat(pid); err == nil {
		t.Errorf("a reaped process still has a stat")
	}
}

func TestUmask(t *testing.T) {
	if m := Umask(); m < 0 || m > 0o777 {
		t.Fatalf("umask %o", m)
	}
}

func TestChildren(t *testing.T) {
	cmd := exec.Command("sleep", "5")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if got := Children(os.Getpid()); !slices.Contains(got, cmd.Process.Pid) {
		t.Fatalf("Children(%d) = %v, want it to hold %d", os.Getpid(), got, cmd.Process.Pid)
	}
	if got := Children(cmd.Process.Pid); len(got) != 0 {
		t.Fatalf("sleep has children %v", got)
	}
}

// TestOpenFDsAndResident: a descriptor opened shows in the count, and the
// resident size is that of a running Go program (more than a megabyte).
func TestOpenFDsAndResident(t *testing.T) {
	before, err := OpenFDs(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if after, _ := OpenFDs(os.Getpid()); after != before+1 {
		t.Errorf("%d descriptors after opening one, %d before", after, before)
	}
	if rss, err := ResidentBytes(os.Getpid()); err != nil || rss < 1<<20 {
		t.Errorf("resident %d bytes, %v", rss, err)
	}
}
