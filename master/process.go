package master

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/master/events"
	"github.com/gorolling/gorolling/master/procfs"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// process is a started worker process as the master sees it. The seam
// lets the state machines be tested with processes that are goroutines.
type process interface {
	// Pid returns the process id.
	Pid() int
	// Signal sends sig to the process (and its process group). It is a
	// no-op once the process has been reaped.
	Signal(sig syscall.Signal)
	// Wait blocks until the process has exited and been reaped, and
	// describes how it ended ("exit status 1", "killed by signal SIGKILL")
	// with an exit code (128+signal for a signal). Only one goroutine
	// calls it, once.
	Wait() (desc string, code int)
}

// procSpec is everything a worker process is started with.
type procSpec struct {
	Path  string   // the executable
	Args  []string // argv, argv[0] included
	Env   []string
	Dir   string
	Files []*os.File // fds 3, 4, ...; the starter does not close them
	Cred  *syscall.Credential
	// Stdout and Stderr are the worker's output.
	Stdout, Stderr *os.File
}

// starter starts a worker process.
type starter func(procSpec) (process, error)

// execStarter starts real processes. Every one is forked from one
// goroutine locked to its OS thread for the master's whole life: workers
// get a parent-death signal, which the kernel ties to the forking thread,
// not to the process, and the Go runtime destroys any thread whose
// goroutine exits while locked to it. A worker forked from such a thread
// would get its "parent died" signal while the master still lives.
//
// With reap (the master is pid 1, a container's init) the same goroutine
// also reaps orphans: processes a worker left behind (a daemon that
// double-forked) are re-parented to pid 1, and a zombie nobody reaps holds
// its pid for ever. It must never reap a worker, whose exit status belongs
// to the goroutine that waits for it: a zombie child is reaped only if it
// is not one this starter started, and since the check runs on the
// goroutine that forks, no worker can be half-started during it.
func execStarter(reap bool, log hclog.Logger) starter {
	reqs := make(chan func())
	ours := map[int]bool{} // workers started and not yet reaped; the goroutine's own
	go func() {
		runtime.LockOSThread()
		var chld chan os.Signal
		var again <-chan time.Time
		if reap {
			chld = make(chan os.Signal, 1)
			signal.Notify(chld, syscall.SIGCHLD)
		}
		for {
			select {
			case f := <-reqs:
				f()
			case <-chld:
				again = reapOrphans(ours, log)
			case <-again:
				again = reapOrphans(ours, log)
			}
		}
	}()
	return func(sp procSpec) (process, error) {
		cmd := &exec.Cmd{
			Path: sp.Path, Args: sp.Args, Env: sp.Env, Dir: sp.Dir,
			Stdout: sp.Stdout, Stderr: sp.Stderr,
			ExtraFiles: sp.Files,
			SysProcAttr: &syscall.SysProcAttr{
				// A terminal's Ctrl-C reaches the master only; the
				// master stops the workers in order. A worker of
				// another account gets a session of its own, which
				// leaves it no controlling terminal: in the master's
				// session it could push input into the operator's shell
				// (TIOCSTI) through the terminal. Either way its process
				// group is its pid.
				Setsid:  sp.Cred != nil,
				Setpgid: sp.Cred == nil,
				// A second line of defence: workers also see their
				// handoff channel close when the master dies.
				Pdeathsig:  syscall.SIGTERM,
				Credential: sp.Cred,
			},
		}
		done := make(chan error, 1)
		reqs <- func() {
			err := cmd.Start()
			if err == nil {
				ours[cmd.Process.Pid] = true
			}
			done <- err
		}
		if err := <-done; err != nil {
			return nil, err
		}
		return &execProcess{cmd: cmd, reaped: func(pid int) {
			reqs <- func() { delete(ours, pid) }
		}}, nil
	}
}

// reapOrphans reaps every zombie child of this process that is not in
// ours. It returns a timer to look again if it had to leave a zombie
// alone (one of ours, which its own goroutine reaps; a pid reused by an
// orphan before that goroutine said so), nil otherwise.
func reapOrphans(ours map[int]bool, log hclog.Logger) <-chan time.Time {
	left := false
	for _, pid := range procfs.Children(os.Getpid()) {
		st, err := procfs.ReadStat(pid)
		if err != nil || st.State != 'Z' {
			continue
		}
		if ours[pid] {
			left = true
			continue
		}
		var ws unix.WaitStatus
		if got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); err == nil && got == pid {
			log.Debug("orphan reaped", events.Key, events.OrphanReaped, "pid", pid, "status", describeWait(ws))
		}
	}
	if left {
		return time.After(100 * time.Millisecond)
	}
	return nil
}

func describeWait(ws unix.WaitStatus) string {
	if ws.Signaled() {
		return "killed by signal " + unix.SignalName(ws.Signal())
	}
	return "exit status " + strconv.Itoa(ws.ExitStatus())
}

type execProcess struct {
	cmd    *exec.Cmd
	reaped func(pid int) // tells the starter the pid is no longer its child
}

func (p *execProcess) Pid() int { return p.cmd.Process.Pid }

// Signal signals the worker's process group (it leads its own), or the
// worker alone if it left the group (setsid). The leader is probed through
// os.Process first, which uses a pidfd and so cannot hit a recycled pid;
// only a live worker's group is signalled, once.
func (p *execProcess) Signal(sig syscall.Signal) {
	if err := p.cmd.Process.Signal(syscall.Signal(0)); err != nil {
		return
	}
	if err := syscall.Kill(-p.cmd.Process.Pid, sig); err != nil {
		_ = p.cmd.Process.Signal(sig)
	}
}

func (p *execProcess) Wait() (string, int) {
	err := p.cmd.Wait()
	p.reaped(p.cmd.Process.Pid)
	ps := p.cmd.ProcessState
	if ps == nil {
		return fmt.Sprintf("wait: %v", err), -1
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return "killed by signal " + unix.SignalName(ws.Signal()), 128 + int(ws.Signal())
	}
	return "exit status " + strconv.Itoa(ps.ExitCode()), ps.ExitCode()
}

// workerEnv builds a worker's environment from base: everything except the
// variables of the protocols the master speaks itself (LISTEN_*,
// NOTIFY_SOCKET, FDSTORE, WATCHDOG_*, GOROLLING_*), followed by extra. Passing the
// master's own would hand workers its systemd state: a worker would send
// READY=1 to systemd itself, or take the master's sockets for its own.
func workerEnv(base []string, extra ...string) []string {
	out := make([]string, 0, len(base)+len(extra))
	for _, kv := range base {
		name, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(name, "LISTEN_"),
			name == "NOTIFY_SOCKET", name == "FDSTORE",
			strings.HasPrefix(name, "WATCHDOG_"),
			strings.HasPrefix(name, "GOROLLING_"):
			continue
		}
		out = append(out, kv)
	}
	return append(out, extra...)
}
