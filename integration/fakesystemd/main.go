// Command fakesystemd is a small service manager for the tests: the parts
// of systemd that a gorolling master relies on to survive its own death,
// without systemd as pid 1. It runs one service:
//
//	fakesystemd [--store-max N] [--watchdog D] [--restart-sec D] -- COMMAND [ARGS...]
//
// Like systemd for a Type=notify service with NotifyAccess=main,
// Restart=on-failure, KillMode=control-group and FileDescriptorStoreMax=N
// (the shipped unit), it
//
//   - listens on a notify socket ($NOTIFY_SOCKET) and believes only the
//     main process, which MAINPID= may change;
//   - keeps the file descriptor store: FDSTORE=1 with FDNAME= adds the
//     attached descriptors (one it holds already is ignored, under
//     whatever name; past N they are dropped), FDSTOREREMOVE=1 with
//     FDNAME= drops every one of that name;
//   - is the subreaper of everything the service starts, as systemd is:
//     the workers of a master that died are re-parented to it;
//   - when the main process fails (a non-zero status or a signal), sends
//     SIGTERM to every process of the service left and waits until they
//     have exited (systemd waits for the cgroup to empty), then
//     RestartSec, then starts COMMAND again
//     with the store's descriptors as fds 3, 4, ..., LISTEN_FDS,
//     LISTEN_FDNAMES, and LISTEN_PID and WATCHDOG_PID set to the new
//     process's own pid (sh sets them and execs COMMAND in place);
//   - serves a watchdog (WatchdogSec=): after READY=1, a main process that
//     sends no WATCHDOG=1 for that long gets SIGABRT, which fails it;
//   - on TERM or INT stops the service: TERM to the main process, no
//     restart, the store flushed; after --stop-timeout, SIGKILL to every
//     process left. HUP, USR2, TTIN and TTOU go to the main process.
//
// The service's output is fakesystemd's own. What fakesystemd sees and
// does goes to its stderr as JSON lines in the master's log format, with
// "event" one of sd.start, sd.exit, sd.ready, sd.mainpid, sd.beat,
// sd.store, sd.remove, sd.full, sd.rejected, sd.watchdog, sd.stop. It
// exits with the last main process's status.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/master/procfs"
	"golang.org/x/sys/unix"
)

type stored struct {
	name     string
	fd       int
	dev, ino uint64
}

type supervisor struct {
	command      []string
	storeMax     int
	watchdog     time.Duration
	restartDelay time.Duration
	stopAfter    time.Duration
	notify       string
	sock         int

	outMu sync.Mutex

	mu       sync.Mutex
	main     int
	store    []stored
	readyAt  time.Time
	lastBeat time.Time
	aborted  map[int]bool
	stopping bool

	barrierDone chan struct{} // receive read a barrier datagram
}

func main() {
	s := &supervisor{aborted: map[int]bool{}, barrierDone: make(chan struct{}, 1)}
	flag.IntVar(&s.storeMax, "store-max", 0, "FileDescriptorStoreMax=: the fd store's size (0: no store)")
	flag.DurationVar(&s.watchdog, "watchdog", 0, "WatchdogSec= (0: none)")
	flag.DurationVar(&s.restartDelay, "restart-sec", 100*time.Millisecond, "RestartSec=")
	flag.DurationVar(&s.stopAfter, "stop-timeout", 60*time.Second, "TimeoutStopSec=")
	flag.Parse()
	s.command = flag.Args()
	if len(s.command) == 0 {
		fmt.Fprintln(os.Stderr, "usage: fakesystemd [flags] -- COMMAND [ARGS...]")
		os.Exit(2)
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "fakesystemd: subreaper:", err)
		os.Exit(1)
	}
	dir, err := os.MkdirTemp("", "fakesystemd-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "fakesystemd:", err)
		os.Exit(1)
	}
	defer os.RemoveAll(dir)
	s.notify = filepath.Join(dir, "notify")
	if s.sock, err = unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err == nil {
		err = unix.Bind(s.sock, &unix.SockaddrUnix{Name: s.notify})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "fakesystemd: notify socket:", err)
		os.Exit(1)
	}
	unix.SetsockoptInt(s.sock, unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	unix.SetsockoptInt(s.sock, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)

	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGUSR2, syscall.SIGTTIN, syscall.SIGTTOU)
	go s.signals(sigs)
	go s.receive()
	if s.watchdog > 0 {
		go s.watch()
	}
	os.Exit(s.run())
}

// event writes one line of what fakesystemd saw or did.
func (s *supervisor) event(ev string, pid int, kv ...any) {
	m := map[string]any{"@level": "info", "@module": "fakesystemd", "@timestamp": time.Now().Format(time.RFC3339Nano), "event": ev, "pid": pid}
	for i := 0; i+1 < len(kv); i += 2 {
		m[fmt.Sprint(kv[i])] = kv[i+1]
	}
	m["@message"] = ev
	b, _ := json.Marshal(m)
	s.outMu.Lock()
	os.Stderr.Write(append(b, '\n'))
	s.outMu.Unlock()
}

// run starts the main process, restarts it while it fails, and returns
// the exit code of the last one.
func (s *supervisor) run() int {
	for {
		pid, err := s.spawn()
		if err != nil {
			s.event("sd.exit", 0, "error", err.Error())
			return 1
		}
		status := s.waitMain(pid)
		s.mu.Lock()
		stopping := s.stopping
		s.mu.Unlock()
		code := exitCode(status)
		failed := code != 0
		s.barrier()
		s.event("sd.exit", pid, "status", describe(status), "code", code)
		// Like systemd with the shipped unit's KillMode=control-group:
		// SIGTERM to the rest of the service (the old workers, which
		// drain), then wait for it to go; past the stop timeout, SIGKILL.
		for _, c := range procfs.Children(os.Getpid()) {
			unix.Kill(c, unix.SIGTERM)
		}
		s.waitAll(s.stopAfter)
		if stopping || !failed {
			s.mu.Lock()
			// systemd releases the store here (FileDescriptorStorePreserve=
			// restart); what the service left in it shows whether its stop
			// emptied it (systemd would keep it across "systemctl restart").
			s.event("sd.inactive", pid, "held", len(s.store))
			for _, st := range s.store {
				unix.Close(st.fd)
			}
			s.store = nil
			s.mu.Unlock()
			return code
		}
		time.Sleep(s.restartDelay)
	}
}

// barrierText is the datagram barrier sends itself.
const barrierText = "FAKESD_BARRIER=1"

// barrier returns once every datagram queued on the notify socket before
// it has been handled: systemd, too, reads what the main process sent
// before it handles the process's exit.
func (s *supervisor) barrier() {
	c, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return
	}
	defer unix.Close(c)
	if unix.Sendto(c, []byte(barrierText), 0, &unix.SockaddrUnix{Name: s.notify}) != nil {
		return
	}
	select {
	case <-s.barrierDone:
	case <-time.After(5 * time.Second):
	}
}

// spawn starts COMMAND with the store's descriptors.
func (s *supervisor) spawn() (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	script := `LISTEN_PID=$$; WATCHDOG_PID=$$; export LISTEN_PID WATCHDOG_PID; exec "$@"`
	argv := append([]string{"/bin/sh", "-c", script, "sh"}, s.command...)
	env := append(os.Environ(), "NOTIFY_SOCKET="+s.notify)
	if s.storeMax > 0 {
		env = append(env, "FDSTORE="+strconv.Itoa(s.storeMax))
	}
	if s.watchdog > 0 {
		env = append(env, "WATCHDOG_USEC="+strconv.FormatInt(s.watchdog.Microseconds(), 10))
	}
	files := []uintptr{0, 1, 2}
	var names []string
	for _, st := range s.store {
		files = append(files, uintptr(st.fd))
		names = append(names, st.name)
	}
	if len(names) > 0 {
		env = append(env, "LISTEN_FDS="+strconv.Itoa(len(names)), "LISTEN_FDNAMES="+strings.Join(names, ":"))
	}
	pid, err := syscall.ForkExec(argv[0], argv, &syscall.ProcAttr{
		Env:   env,
		Files: files,
		Sys:   &syscall.SysProcAttr{Setpgid: true},
	})
	if err != nil {
		return 0, err
	}
	s.main, s.readyAt, s.lastBeat = pid, time.Time{}, time.Time{}
	s.event("sd.start", pid, "stored", len(names))
	return pid, nil
}

// waitMain reaps children until the main process (which MAINPID= may
// have moved to another process) has exited, and returns its status.
func (s *supervisor) waitMain(first int) unix.WaitStatus {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			// No child left at all: a main process we cannot see ended.
			return ws
		}
		s.mu.Lock()
		main := s.main
		s.mu.Unlock()
		if pid == main {
			return ws
		}
	}
}

// waitAll reaps until no child is left, killing what is left after d.
func (s *supervisor) waitAll(d time.Duration) {
	deadline := time.Now().Add(d)
	for {
		var ws unix.WaitStatus
		_, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.ECHILD {
			return
		}
		if time.Now().After(deadline) {
			for _, pid := range procfs.Children(os.Getpid()) {
				unix.Kill(pid, unix.SIGKILL)
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func exitCode(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

func describe(ws unix.WaitStatus) string {
	if ws.Signaled() {
		return "killed by signal " + unix.SignalName(ws.Signal())
	}
	return "exit status " + strconv.Itoa(ws.ExitStatus())
}

// signals stops the service on TERM and INT, and passes the others on.
func (s *supervisor) signals(sigs <-chan os.Signal) {
	for sig := range sigs {
		s.mu.Lock()
		main := s.main
		if sig == syscall.SIGTERM || sig == syscall.SIGINT {
			if !s.stopping {
				s.event("sd.stop", main)
			}
			s.stopping = true
			sig = syscall.SIGTERM
		}
		s.mu.Unlock()
		if main > 0 {
			unix.Kill(main, sig.(syscall.Signal))
		}
	}
}

// receive reads the notify socket.
func (s *supervisor) receive() {
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred)+unix.CmsgSpace(253*4))
	for {
		n, oobn, _, _, err := unix.Recvmsg(s.sock, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return
		}
		pid := 0
		var fds []int
		if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, m := range msgs {
				if cr, err := unix.ParseUnixCredentials(&m); err == nil {
					pid = int(cr.Pid)
				}
				if r, err := unix.ParseUnixRights(&m); err == nil {
					fds = append(fds, r...)
				}
			}
		}
		if pid == os.Getpid() && string(buf[:n]) == barrierText {
			s.barrierDone <- struct{}{}
			continue
		}
		s.handle(pid, string(buf[:n]), fds)
	}
}

// handle applies one datagram; it owns fds.
func (s *supervisor) handle(pid int, text string, fds []int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	defer func() {
		for _, fd := range fds {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
	}()
	if pid != s.main {
		s.event("sd.rejected", pid, "text", text, "main", s.main)
		return
	}
	vars := map[string]string{}
	for _, line := range strings.Split(text, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			vars[k] = v
		}
	}
	if v, ok := vars["MAINPID"]; ok {
		if n, err := strconv.Atoi(v); err == nil && n > 0 {
			s.main = n
			s.event("sd.mainpid", pid, "main", n)
		}
	}
	if vars["READY"] == "1" && s.readyAt.IsZero() {
		s.readyAt = time.Now()
		s.event("sd.ready", pid)
	}
	if vars["WATCHDOG"] == "1" {
		s.lastBeat = time.Now()
		s.event("sd.beat", pid)
	}
	if vars["FDSTOREREMOVE"] == "1" {
		name := vars["FDNAME"]
		kept := s.store[:0]
		for _, st := range s.store {
			if st.name == name {
				unix.Close(st.fd)
				continue
			}
			kept = append(kept, st)
		}
		s.store = kept
		s.event("sd.remove", pid, "name", name, "held", len(s.store))
	}
	if vars["FDSTORE"] == "1" && s.storeMax > 0 {
		name := vars["FDNAME"]
		if name == "" {
			name = "stored"
		}
	next:
		for i, fd := range fds {
			var st unix.Stat_t
			if unix.Fstat(fd, &st) != nil {
				continue
			}
			for _, have := range s.store {
				if have.dev == uint64(st.Dev) && have.ino == st.Ino {
					continue next
				}
			}
			if len(s.store) >= s.storeMax {
				s.event("sd.full", pid, "name", name)
				continue
			}
			s.store = append(s.store, stored{name: name, fd: fd, dev: uint64(st.Dev), ino: st.Ino})
			fds[i] = -1
			s.event("sd.store", pid, "name", name, "held", len(s.store))
		}
	}
}

// watch aborts a main process that misses its watchdog beats.
func (s *supervisor) watch() {
	for range time.Tick(s.watchdog / 20) {
		s.mu.Lock()
		last := s.lastBeat
		if last.Before(s.readyAt) {
			last = s.readyAt
		}
		if !s.readyAt.IsZero() && !s.stopping && !s.aborted[s.main] && time.Since(last) > s.watchdog {
			s.aborted[s.main] = true
			s.event("sd.watchdog", s.main, "silent_for", time.Since(last).Round(time.Millisecond).String())
			unix.Kill(s.main, unix.SIGABRT)
		}
		s.mu.Unlock()
	}
}
