// Command testworker is a scriptable worker for the integration tests. It
// runs the operations in $TW_SCRIPT (separated by ';') and appends one JSON
// line per operation to the file $TW_REPORT, then serves HTTP on every
// stream listener it got (a request with ?sleep=DURATION is answered that
// much later) and echoes on every packet socket, until drained.
//
// Operations (a "slotN:", "idN:" or "genN:" prefix limits one to that
// slot, worker id or generation):
//
//	listen NET ADDR         worker.Listen
//	listenpacket NET ADDR   worker.ListenPacket
//	listenfd N              worker.ListenFD
//	listenpacketfd N        worker.ListenPacketFD
//	exclusive NET ADDR      worker.ListenConfig{Exclusive: true}.Listen
//	own NET ADDR            net.Listen directly (a listener the worker holds)
//	noready                 do not call worker.Ready
//	crash                   exit 3 at once
//	sleep DURATION          sleep
//	orphans N               leave N short-lived orphans (background
//	                        sleeps of a shell that exits at once)
//	raw TEXT                send TEXT as one raw record on the handoff fd
//	rawfd TEXT              the same, with three descriptors attached
//	rawmanyfd TEXT          the same, with 64 descriptors (overflows the master's buffer)
//	flood N                 send N valid "ready" records as fast as
//	                        possible, reading the replies raw (so the
//	                        worker package must not be used afterwards)
//	floodblind N            the same without reading a reply
//	closeall                close every listener (after reporting)
//	notify TEXT             send TEXT to $NOTIFY_SOCKET (\n, \e and \a stand
//	                        for newline, ESC and BEL)
//	notifysibling TEXT      send it to the notify socket of worker id-1
//	dial NET ADDR           connect to ADDR (reports the error, if any)
//	relisten NET ADDR       close the last listener, then listen again
//	listenmany N NET ADDR   N listens; ADDR may hold {i} (0..N-1), {id},
//	                        {slot}, {gen}, {gen2} (gen%2) and {id200}
//	                        (1 + id%200); one
//	                        report with the count that succeeded
//	swap DIR A B            exchange DIR/A and DIR/B (renameat2
//	                        RENAME_EXCHANGE) in a loop until drained
//	notifyflood D           flood $NOTIFY_SOCKET with STATUS= lines from 8
//	                        goroutines for D, then go on
//	fakecontrol PATH        serve a forged gorolling control socket at PATH
//	                        (mode 0777) until drained
//	env NAME                report $NAME (as it was at start) in "env"
//	cwd                     report the working directory in "addr"
//	blockall                switch every listener's shared socket to
//	                        blocking mode (as a careless program would)
//	rawadopter MODE NET ADDR, hostile NET ADDR
//	                        speak the protocol by hand (see raw.go); they
//	                        never return
//
// At start it reports the descriptors it inherited (op "fds"), leaving
// out the cgroup files the Go runtime opens before main. A worker without
// listeners reports its drain (op "drained", the time left until the drain
// deadline).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/worker"
	"golang.org/x/sys/unix"
)

// startFDs is evaluated before main runs, before the runtime or any package
// has reason to open a descriptor: exactly what the master gave us.
// The Go runtime itself keeps cgroup files open (for GOMAXPROCS) from
// before package initialisation; those are left out.
var startFDs = func() []int {
	var fds []int
	for fd := 0; fd < 1024; fd++ {
		if _, _, e := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_GETFD, 0); e == 0 {
			if l, _ := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd)); strings.HasPrefix(l, "/sys/fs/cgroup/") {
				continue
			}
			fds = append(fds, fd)
		}
	}
	return fds
}()

type report struct {
	PID   int    `json:"pid"`
	Slot  int    `json:"slot"`
	ID    int    `json:"id"`
	Gen   int    `json:"gen"`
	Op    string `json:"op"`
	Arg   string `json:"arg,omitempty"`
	Addr  string `json:"addr,omitempty"`
	Err   string `json:"err,omitempty"`
	Errno string `json:"errno,omitempty"`
	FDs   []int  `json:"fds,omitempty"`
	// Env is GOROLLING_FD as seen at start.
	Env string `json:"env,omitempty"`
	// OK counts the successes of a listenmany.
	OK int `json:"ok,omitempty"`
}

// startEnv is the environment as the worker started with it (the worker
// package removes variables it consumes).
var startEnv = func() map[string]string {
	m := map[string]string{}
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}()

var reportFile *os.File

func emit(r report) {
	r.PID, r.Slot, r.ID, r.Gen = os.Getpid(), worker.Slot(), worker.ID(), worker.Generation()
	b, _ := json.Marshal(r)
	if reportFile != nil {
		reportFile.Write(append(b, '\n'))
	}
}

func errnoName(err error) string {
	for _, e := range []syscall.Errno{syscall.EADDRINUSE, syscall.EACCES, syscall.EPERM, syscall.EBADF, syscall.EINVAL, syscall.EPROTOTYPE, syscall.EADDRNOTAVAIL, syscall.EMFILE, syscall.ENFILE} {
		if errors.Is(err, e) {
			return strconv.Itoa(int(e))
		}
	}
	return ""
}

func main() {
	if p := os.Getenv("TW_REPORT"); p != "" {
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			fmt.Fprintln(os.Stderr, "testworker:", err)
			os.Exit(2)
		}
		reportFile = f
	}
	emit(report{Op: "fds", FDs: startFDs, Env: os.Getenv("GOROLLING_FD")})

	var listeners []net.Listener
	var packets []net.PacketConn
	ready := true
	for _, op := range strings.Split(os.Getenv("TW_SCRIPT"), ";") {
		op = strings.TrimSpace(op)
		if op == "" {
			continue
		}
		if pfx, rest, ok := strings.Cut(op, ":"); ok && !strings.Contains(pfx, " ") {
			if !matches(pfx) {
				continue
			}
			op = strings.TrimSpace(rest)
		}
		f := strings.Fields(op)
		name, args := f[0], f[1:]
		arg := strings.Join(args, " ")
		r := report{Op: name, Arg: arg}
		switch name {
		case "listen", "exclusive", "own", "relisten":
			var l net.Listener
			var err error
			switch name {
			case "listen":
				l, err = worker.Listen(args[0], args[1])
			case "relisten":
				if n := len(listeners); n > 0 {
					listeners[n-1].Close()
					listeners = listeners[:n-1]
				}
				l, err = worker.Listen(args[0], args[1])
			case "exclusive":
				lc := worker.ListenConfig{Exclusive: true}
				l, err = lc.Listen(context.Background(), args[0], args[1])
			case "own":
				l, err = net.Listen(args[0], args[1])
			}
			if err != nil {
				r.Err, r.Errno = err.Error(), errnoName(err)
			} else {
				r.Addr = l.Addr().String()
				listeners = append(listeners, l)
			}
		case "listenmany":
			n, _ := strconv.Atoi(args[0])
			for i := 0; i < n; i++ {
				l, err := worker.Listen(args[1], expand(args[2], i))
				if err != nil {
					if r.Err == "" {
						r.Err, r.Errno = err.Error(), errnoName(err)
					}
					continue
				}
				r.OK++
				listeners = append(listeners, l)
			}
		case "swap":
			go swapLoop(args[0], args[1], args[2])
		case "notifyflood":
			d, _ := time.ParseDuration(arg)
			r.OK = notifyFlood(d)
		case "fakecontrol":
			l, err := net.Listen("unix", args[0])
			if err != nil {
				r.Err = err.Error()
				break
			}
			os.Chmod(args[0], 0o777)
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					c.Read(make([]byte, 4096))
					io.WriteString(c, `{"ok":true,"status":{"pid":1,"version":"forged","program":"forged"}}`+"\n")
					c.Close()
				}
			}()
		case "env":
			r.Env = startEnv[args[0]]
		case "cwd":
			r.Addr, _ = os.Getwd()
		case "tiocsti":
			// Push a line into the input of whatever terminal the worker
			// can reach (its stdout, its stderr, /dev/tty): r.Addr lists
			// where the kernel took it.
			var took []string
			try := func(name string, fd int) {
				for _, c := range []byte(args[0] + "\n") {
					if err := unix.IoctlSetPointerInt(fd, unix.TIOCSTI, int(c)); err != nil {
						return
					}
				}
				took = append(took, name)
			}
			try("stdout", 1)
			try("stderr", 2)
			if f, err := os.OpenFile("/dev/tty", os.O_RDWR, 0); err == nil {
				try("/dev/tty", int(f.Fd()))
				f.Close()
			}
			r.Addr = strings.Join(took, ",")
		case "blockall":
			for _, l := range listeners {
				if sc, ok := l.(syscall.Conn); ok {
					if rc, err := sc.SyscallConn(); err == nil {
						rc.Control(func(fd uintptr) { syscall.SetNonblock(int(fd), false) })
					}
				}
			}
		case "listenpacket":
			pc, err := worker.ListenPacket(args[0], args[1])
			if err != nil {
				r.Err, r.Errno = err.Error(), errnoName(err)
			} else {
				r.Addr = pc.LocalAddr().String()
				packets = append(packets, pc)
			}
		case "listenfd":
			n, _ := strconv.Atoi(args[0])
			l, err := worker.ListenFD(n)
			if err != nil {
				r.Err, r.Errno = err.Error(), errnoName(err)
			} else {
				r.Addr = l.Addr().String()
				listeners = append(listeners, l)
			}
		case "listenpacketfd":
			n, _ := strconv.Atoi(args[0])
			pc, err := worker.ListenPacketFD(n)
			if err != nil {
				r.Err, r.Errno = err.Error(), errnoName(err)
			} else {
				r.Addr = pc.LocalAddr().String()
				packets = append(packets, pc)
			}
		case "noready":
			ready = false
		case "crash":
			emit(r)
			os.Exit(3)
		case "sleep":
			d, _ := time.ParseDuration(arg)
			time.Sleep(d)
		case "orphans":
			// A shell that starts N background sleeps and exits at once:
			// the sleeps are orphaned, re-parented to the nearest
			// subreaper or pid 1, and become zombies when they end.
			n, _ := strconv.Atoi(arg)
			if err := exec.Command("/bin/sh", "-c", fmt.Sprintf("for i in $(seq %d); do sleep 0.2 & done", n)).Run(); err != nil {
				r.Err = err.Error()
			}
		case "raw":
			r.Err = sendRaw(arg, 0)
		case "rawfd":
			r.Err = sendRaw(arg, 3)
		case "rawmanyfd":
			r.Err = sendRaw(arg, 64)
		case "flood", "floodblind":
			// Valid requests as fast as possible, reading the replies
			// (flood) or not (floodblind).
			n, _ := strconv.Atoi(arg)
			replies := make(chan struct{})
			if name == "floodblind" {
				n = 0
			}
			go func() {
				defer close(replies)
				fd, _ := strconv.Atoi(os.Getenv("GOROLLING_FD"))
				buf := make([]byte, 4096)
				for got := 0; got < n; got++ {
					if _, _, _, _, err := syscall.Recvmsg(fd, buf, nil, 0); err != nil {
						return
					}
				}
			}()
			count, _ := strconv.Atoi(arg)
			for i := 0; i < count; i++ {
				if e := sendRaw(fmt.Sprintf(`{"v":1,"type":"ready","seq":%d}`, i+1), 0); e != "" {
					r.Err = e
					break
				}
			}
			<-replies
		case "notify", "notifysibling":
			path := os.Getenv("NOTIFY_SOCKET")
			if name == "notifysibling" {
				path = strings.Replace(path, "notify-"+strconv.Itoa(worker.ID())+".sock", "notify-"+strconv.Itoa(worker.ID()-1)+".sock", 1)
			}
			r.Err = notify(path, strings.NewReplacer(`\n`, "\n", `\e`, "\x1b", `\a`, "\a").Replace(arg))
		case "dial":
			c, err := net.DialTimeout(args[0], args[1], 2*time.Second)
			if err != nil {
				r.Err = err.Error()
			} else {
				c.Close()
			}
		case "rawadopter":
			rawAdopter(args[0], args[1], args[2])
		case "hostile":
			hostile(args[0], args[1])
		case "closeall":
			for _, l := range listeners {
				l.Close()
			}
			listeners = nil
		default:
			r.Err = "unknown op"
		}
		emit(r)
	}

	for _, pc := range packets {
		go echo(pc)
	}
	if len(listeners) == 0 {
		worker.HandleSignals() // the master's SIGTERM after "drain" must not kill us
		if ready {
			worker.Ready()
		}
		<-worker.Context().Done()
		emit(report{Op: "drained", Arg: time.Until(worker.DrainDeadline()).Round(time.Second).String()})
		return
	}
	pid := strconv.Itoa(os.Getpid())
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Pid", pid)
		w.Header().Set("X-Generation", strconv.Itoa(worker.Generation()))
		w.Header().Set("X-Slot", strconv.Itoa(worker.Slot()))
		if d, err := time.ParseDuration(r.URL.Query().Get("sleep")); err == nil && d > 0 && d <= time.Minute {
			time.Sleep(d) // a request that is still in flight when a drain starts
		}
		fmt.Fprintf(w, "pid=%s local=%s\n", pid, r.Context().Value(http.LocalAddrContextKey))
	})}
	if err := worker.ServeHTTPWith(srv, worker.HTTPOptions{NoReady: !ready, Grace: 300 * time.Millisecond}, listeners...); err != nil {
		fmt.Fprintln(os.Stderr, "testworker: serve:", err)
		os.Exit(1)
	}
}

// expand fills in the placeholders of a listenmany address.
func expand(addr string, i int) string {
	return strings.NewReplacer(
		"{i}", strconv.Itoa(i),
		"{id}", strconv.Itoa(worker.ID()),
		"{id200}", strconv.Itoa(1+worker.ID()%200),
		"{slot}", strconv.Itoa(worker.Slot()),
		"{gen}", strconv.Itoa(worker.Generation()),
		"{gen2}", strconv.Itoa(worker.Generation()%2),
	).Replace(addr)
}

// swapLoop exchanges dir/a and dir/b atomically, as fast as it can, until
// the worker drains: an attacker racing the master's path operations.
func swapLoop(dir, a, b string) {
	pa, pb := dir+"/"+a, dir+"/"+b
	for {
		select {
		case <-worker.Draining():
			return
		default:
		}
		for i := 0; i < 1000; i++ {
			unix.Renameat2(unix.AT_FDCWD, pa, unix.AT_FDCWD, pb, unix.RENAME_EXCHANGE)
		}
	}
}

// notifyFlood sends STATUS= datagrams to $NOTIFY_SOCKET from 8 goroutines
// for d and returns how many went out.
func notifyFlood(d time.Duration) int {
	path := os.Getenv("NOTIFY_SOCKET")
	var sent atomic.Int64
	var wg sync.WaitGroup
	end := time.Now().Add(d)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
			if err != nil {
				return
			}
			defer c.Close()
			for i := 0; time.Now().Before(end); i++ {
				c.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
				if _, err := fmt.Fprintf(c, "STATUS=flood %d of goroutine %d\nX-FLOOD=1", i, g); err == nil {
					sent.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	return int(sent.Load())
}

func matches(pfx string) bool {
	for _, c := range []struct {
		name string
		v    int
	}{{"slot", worker.Slot()}, {"id", worker.ID()}, {"gen", worker.Generation()}} {
		if n, ok := strings.CutPrefix(pfx, c.name); ok {
			want, err := strconv.Atoi(n)
			return err == nil && want == c.v
		}
	}
	return false
}

func echo(pc net.PacketConn) {
	buf := make([]byte, 2048)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		msg := fmt.Sprintf("pid=%d got=%s", os.Getpid(), buf[:n])
		pc.WriteTo([]byte(msg), from)
	}
}

// sendRaw writes one record straight onto the handoff channel, bypassing
// the worker package.
func sendRaw(text string, nfds int) string {
	fd, err := strconv.Atoi(os.Getenv("GOROLLING_FD"))
	if err != nil {
		return "no GOROLLING_FD"
	}
	var oob []byte
	if nfds > 0 {
		oob = syscall.UnixRights(make([]int, nfds)...) // stdin, nfds times
	}
	if err := syscall.Sendmsg(fd, []byte(text), oob, nil, 0); err != nil {
		return err.Error()
	}
	return ""
}

func notify(path, text string) string {
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err.Error()
	}
	defer c.Close()
	if _, err := c.Write([]byte(text)); err != nil {
		return err.Error()
	}
	return ""
}
