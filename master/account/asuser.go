package account

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// RunAs: doing filesystem and bind work with a worker's credentials.
//
// A root master that checks a worker-chosen path and then acts on it by
// name races with the worker: between the check and the act, the worker can
// swap a directory of the path for a symlink and make root act on a file of
// its choosing. Checking permissions ourselves is also never complete (ACLs,
// search permission on every parent, sticky directories, the protected_*
// sysctls, SO_REUSEPORT's uid match). So the master does not check: it does
// the work on an OS thread that carries the worker's credentials, and the
// kernel decides, exactly as it would for the worker itself.
//
// Credentials are per thread in Linux; Go's syscall.Setuid and friends
// change every thread of the process, so the raw system calls are used
// here, on a goroutine locked to its thread. The goroutine never unlocks,
// so when it returns the Go runtime destroys the thread instead of reusing
// it, and no other goroutine ever runs with those credentials. (The runtime
// never clones a new thread from a locked one, so none inherits them
// either.)
//
// Only the effective ids change (and with them the filesystem ids, which
// follow the effective ones). The real and saved ids stay the master's, so
// the worker's account cannot signal or ptrace the thread while it exists:
// the kernel's permission checks for both compare against the real and
// saved ids. Changing the effective uid from 0 clears the thread's
// effective capabilities, so binding a privileged port fails as it would
// for the worker, and a socket's owner (which SO_REUSEPORT compares) is the
// worker.

// A credential change resets the process's dumpable flag (it belongs to
// the whole process). The last RunAs to finish sets it back to what it was
// before the first began; calls run concurrently, so that one path lookup
// that hangs (a dead network mount) holds up only its own caller.
var dumpable struct {
	sync.Mutex
	active int
	saved  int
}

// RunAs runs fn on a fresh OS thread whose effective uid, gid and
// supplementary groups are a's (a nil a keeps the master's) and whose umask
// is umask (in a filesystem context of its own, so the master's other
// threads keep theirs). fn must not start goroutines that do privileged
// work: they run elsewhere. RunAs blocks until fn returns and returns fn's
// error. A panic in fn is returned as an error.
func RunAs(a *Account, umask int, fn func() error) error {
	dumpable.Lock()
	if dumpable.active == 0 {
		dumpable.saved, _ = unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
	}
	dumpable.active++
	dumpable.Unlock()
	done := make(chan error, 1)
	tid := make(chan int, 1)
	onDoomedThread(func() {
		tid <- unix.Gettid()
		defer func() {
			if p := recover(); p != nil {
				done <- fmt.Errorf("internal error: %v", p)
			}
		}()
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			done <- fmt.Errorf("unshare the filesystem context: %w", err)
			return
		}
		unix.Umask(umask)
		if a != nil {
			if err := setThreadCreds(a); err != nil {
				done <- err
				return
			}
		}
		done <- fn()
	})
	err := <-done
	// Return only once the thread is gone, so that no thread with the
	// worker's ids outlives the call (ps, /proc and the tests see none).
	task := "/proc/self/task/" + strconv.Itoa(<-tid)
	for i := 0; i < 2000; i++ {
		if _, serr := os.Stat(task); serr != nil {
			break
		}
		time.Sleep(50 * time.Microsecond)
	}
	dumpable.Lock()
	if dumpable.active--; dumpable.active == 0 && dumpable.saved == 1 {
		_ = unix.Prctl(unix.PR_SET_DUMPABLE, 1, 0, 0, 0)
	}
	dumpable.Unlock()
	return err
}

// onDoomedThread runs fn on a goroutine locked to an OS thread that the Go
// runtime destroys when fn returns. The main thread is never destroyed
// (the runtime parks it for good instead), and its ids are the ones ps and
// kill(2) see for the whole process: if the goroutine lands there, fn runs
// on another thread while the main one waits, unchanged.
func onDoomedThread(fn func()) {
	go func() {
		runtime.LockOSThread()
		if unix.Gettid() != unix.Getpid() {
			fn() // never unlocked: the thread ends with the goroutine
			return
		}
		defer runtime.UnlockOSThread()
		inner := make(chan struct{})
		go func() {
			defer close(inner)
			runtime.LockOSThread() // cannot be the main thread: it is taken
			fn()
		}()
		<-inner
	}()
}

// setThreadCreds gives the calling thread a's groups and effective ids.
func setThreadCreds(a *Account) error {
	groups := make([]uint32, len(a.Groups))
	copy(groups, a.Groups)
	var p unsafe.Pointer
	if len(groups) > 0 {
		p = unsafe.Pointer(&groups[0])
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, uintptr(len(groups)), uintptr(p), 0); e != 0 {
		return fmt.Errorf("take the groups of %s: %w", a.User, e)
	}
	keep := ^uintptr(0) // -1: leave the real and saved ids alone
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, keep, uintptr(a.GID), keep); e != 0 {
		return fmt.Errorf("take the gid of %s: %w", a.User, e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, keep, uintptr(a.UID), keep); e != 0 {
		return fmt.Errorf("take the uid of %s: %w", a.User, e)
	}
	runtime.KeepAlive(groups)
	return nil
}

// OpenDirNoFollow opens dir (absolute) as an O_PATH descriptor without
// following any symlink on the way, so that later *at() calls on it act in
// exactly that directory, whatever is renamed meanwhile. The caller closes
// the descriptor.
func OpenDirNoFollow(dir string) (int, error) {
	how := &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	}
	fd, err := unix.Openat2(unix.AT_FDCWD, dir, how)
	if !errors.Is(err, unix.ENOSYS) {
		return fd, err
	}
	// Kernels before 5.6: walk the path one component at a time.
	fd, err = unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	for _, c := range strings.Split(filepath.Clean(dir), "/") {
		if c == "" {
			continue
		}
		next, err := unix.Openat(fd, c, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		unix.Close(fd)
		if err != nil {
			return -1, err
		}
		fd = next
	}
	return fd, nil
}
