package registry

import (
	"os"
	"strconv"

	"github.com/coreos/go-systemd/v22/activation"
	"golang.org/x/sys/unix"
)

// Inherited is one socket the master inherited.
type Inherited struct {
	// FD is the descriptor that holds it now (raw, close-on-exec; the
	// caller owns it until Adopt).
	FD int
	// Number is the descriptor number it was inherited on: workers ask for
	// it as fd:Number (Node's listen({fd})).
	Number int
	// Name is its LISTEN_FDNAMES name, if systemd gave one.
	Name string
}

// ScanInherited returns the sockets at or above fd 3 that this process
// inherited: those of systemd's socket activation (LISTEN_FDS for this pid,
// with their LISTEN_FDNAMES names; the LISTEN_* variables are removed, as
// sd_listen_fds(unset=1) does), and any other socket left open by whoever
// started it (a shell redirect). It marks every inherited descriptor,
// socket or not, close-on-exec, so none leaks into workers. Call it first
// thing in main, before anything else opens descriptors; skip lists
// descriptors that belong to someone else.
func ScanInherited(skip ...int) []Inherited {
	var out []Inherited
	seen := map[int]bool{}
	for _, s := range skip {
		seen[s] = true
	}
	for _, f := range activation.Files(true) {
		// activation wraps each socket in an *os.File; the registry holds
		// raw descriptors, so take a duplicate and close the File (whose
		// finalizer would otherwise close the descriptor some day).
		n, d := -1, -1
		if rc, err := f.SyscallConn(); err == nil {
			rc.Control(func(fd uintptr) {
				n = int(fd)
				d, _ = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
			})
		}
		name := f.Name()
		f.Close()
		if n < 0 || d < 0 {
			continue
		}
		seen[n] = true
		if name == "LISTEN_FD_"+strconv.Itoa(n) {
			name = "" // activation's placeholder: systemd gave no name
		}
		out = append(out, Inherited{FD: d, Number: n, Name: name})
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return out
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < 3 || seen[fd] {
			continue
		}
		var st unix.Stat_t
		if unix.Fstat(fd, &st) != nil {
			continue // the directory descriptor ReadDir used, closed by now
		}
		unix.CloseOnExec(fd)
		if st.Mode&unix.S_IFMT == unix.S_IFSOCK {
			out = append(out, Inherited{FD: fd, Number: fd})
		}
	}
	return out
}
