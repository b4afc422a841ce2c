package master

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"

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
func execStarter() starter {
	reqs := make(chan func())
	go func() {
		runtime.LockOSThread()
		for f := range reqs {
			f()
		}
	}()
	return func(sp procSpec) (process, error) {
		cmd := &exec.Cmd{
			Path: sp.Path, Args: sp.Args, Env: sp.Env, Dir: sp.Dir,
			Stdout: sp.Stdout, Stderr: sp.Stderr,
			ExtraFiles: sp.Files,
			SysProcAttr: &syscall.SysProcAttr{
				// A terminal's Ctrl-C reaches the master only; the
				// master stops the workers in order.
				Setpgid: true,
				// A second line of defence: workers also see their
				// handoff channel close when the master dies.
				Pdeathsig:  syscall.SIGTERM,
				Credential: sp.Cred,
			},
		}
		done := make(chan error, 1)
		reqs <- func() { done <- cmd.Start() }
		if err := <-done; err != nil {
			return nil, err
		}
		return &execProcess{cmd: cmd}, nil
	}
}

type execProcess struct{ cmd *exec.Cmd }

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
// NOTIFY_SOCKET, WATCHDOG_*, GOROLLING_*), followed by extra. Passing the
// master's own would hand workers its systemd state: a worker would send
// READY=1 to systemd itself, or take the master's sockets for its own.
func workerEnv(base []string, extra ...string) []string {
	out := make([]string, 0, len(base)+len(extra))
	for _, kv := range base {
		name, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(name, "LISTEN_"),
			name == "NOTIFY_SOCKET",
			strings.HasPrefix(name, "WATCHDOG_"),
			strings.HasPrefix(name, "GOROLLING_"):
			continue
		}
		out = append(out, kv)
	}
	return append(out, extra...)
}
