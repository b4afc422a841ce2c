package master

import (
	"os/exec"
	"runtime"
	"strings"
)

// spawner starts every worker from one goroutine locked to its OS thread
// for the master's whole life. Workers get Pdeathsig, which the kernel ties
// to the forking thread, not the process (PITFALLS #1): a thread that the Go
// runtime destroys would signal its workers while the master still lives.
// This goroutine never unlocks or returns, so its thread is never destroyed.
type spawner struct {
	reqs chan spawnReq
}

type spawnReq struct {
	cmd  *exec.Cmd
	done chan error
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan spawnReq)}
	go func() {
		runtime.LockOSThread()
		for r := range s.reqs {
			r.done <- r.cmd.Start()
		}
	}()
	return s
}

// start runs cmd.Start on the spawner thread and returns its error.
func (s *spawner) start(cmd *exec.Cmd) error {
	done := make(chan error, 1)
	s.reqs <- spawnReq{cmd: cmd, done: done}
	return <-done
}

// WorkerEnv builds a worker's environment from base: everything except the
// variables of protocols the master speaks itself (LISTEN_*, NOTIFY_SOCKET,
// WATCHDOG_*, GOROLLING_*), which would otherwise leak the master's own
// systemd state into workers (PITFALLS #5), followed by extra.
func WorkerEnv(base []string, extra ...string) []string {
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
