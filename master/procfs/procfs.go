// Package procfs reads the few facts about processes that gorolling takes
// from Linux's /proc: whether a pid runs, its parent and process group, a
// process's children, its open descriptors and resident memory, and the
// calling process's umask. It is the one parser of /proc/PID/stat in the
// module.
package procfs

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Stat is what /proc/PID/stat says about one process.
type Stat struct {
	// State is the one-letter state: R, S, D, Z (zombie), T, ...
	State byte
	// PPid is the parent's pid, PGrp the process group.
	PPid, PGrp int
	// CPU is the processor time the process used so far, user and system
	// (its own threads, not its children).
	CPU time.Duration
	// Start is when the process started, in clock ticks after boot: with
	// the pid, it names one process even after the pid is reused.
	Start uint64
}

// clockTick is the unit of the CPU times in /proc/PID/stat: USER_HZ, 100
// on every Linux architecture.
const clockTick = 10 * time.Millisecond

// errFormat reports a /proc/PID/stat line that does not parse.
var errFormat = errors.New("procfs: unexpected /proc/PID/stat format")

// ReadStat reads /proc/PID/stat. The command name (field 2) may hold any
// byte, spaces and parentheses included, so the fields after it are found
// from the last ')'.
func ReadStat(pid int) (Stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return Stat{}, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return Stat{}, errFormat
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 3 || len(f[0]) != 1 {
		return Stat{}, errFormat
	}
	ppid, err1 := strconv.Atoi(f[1])
	pgrp, err2 := strconv.Atoi(f[2])
	if err1 != nil || err2 != nil {
		return Stat{}, errFormat
	}
	st := Stat{State: f[0][0], PPid: ppid, PGrp: pgrp}
	if len(f) > 12 {
		// Fields 14 and 15 of the line: utime and stime.
		ut, err1 := strconv.ParseUint(f[11], 10, 64)
		sy, err2 := strconv.ParseUint(f[12], 10, 64)
		if err1 == nil && err2 == nil {
			st.CPU = time.Duration(ut+sy) * clockTick
		}
	}
	if len(f) > 19 {
		// Field 22 of the line: starttime.
		st.Start, _ = strconv.ParseUint(f[19], 10, 64)
	}
	return st, nil
}

// Running reports whether pid is a running process; a zombie (exited, not
// yet reaped) is not.
func Running(pid int) bool {
	st, err := ReadStat(pid)
	return err == nil && st.State != 'Z'
}

// Umask returns the calling process's umask without changing it (umask(2)
// can only read it by setting it, which would race with other threads),
// or 022 if /proc does not say.
func Umask() int {
	b, err := os.ReadFile("/proc/self/status")
	if err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "Umask:"); ok {
				if n, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32); err == nil {
					return int(n)
				}
			}
		}
	}
	return 0o022
}

// Children returns the pids whose parent is pid. Linux has no index of a
// process's children that covers re-parented orphans too, so it reads the
// stat file of every process in /proc.
func Children(pid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := ReadStat(n); err == nil && st.PPid == pid {
			out = append(out, n)
		}
	}
	return out
}

// OpenFDs returns how many descriptors pid has open.
func OpenFDs(pid int) (int, error) {
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	return len(ents), err
}

// ResidentBytes returns pid's resident memory (RSS), from
// /proc/PID/statm.
func ResidentBytes(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/statm")
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0, fmt.Errorf("procfs: /proc/%d/statm: %q", pid, b)
	}
	pages, err := strconv.ParseUint(f[1], 10, 64)
	return pages * uint64(unix.Getpagesize()), err
}
