package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/master/events"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// Limits of the server.
const (
	// maxRequest bounds one request line.
	maxRequest = 64 << 10
	// maxConns bounds the connections the server holds at once. Past it, a
	// new connection takes the place of the one that has waited longest
	// without sending its request; if every one is busy (an "upgrade
	// --wait", say), the newcomer is told so and closed.
	maxConns = 64
	// requestTimeout bounds the wait for a connection's request.
	requestTimeout = 5 * time.Second
)

// Handler does what the requests ask. Its methods may be called
// concurrently.
type Handler interface {
	// Status returns a snapshot of the master.
	Status() Status
	// Upgrade starts (or queues) an upgrade of kind ("auto", "workers" or
	// "master") and returns a channel that receives its outcome.
	Upgrade(kind string) (<-chan UpgradeOutcome, error)
	// Scale sets the number of workers to n, or changes it by delta if
	// delta is not zero, and returns the new number.
	Scale(n, delta int) (int, error)
	// Stop asks for a graceful stop; it does not wait for it.
	Stop() error
}

// Server is a control socket being served.
type Server struct {
	l    *net.UnixListener
	path string
	ino  uint64 // the socket file's inode when the server started
	log  hclog.Logger
	wg   sync.WaitGroup // connections being answered

	mu    sync.Mutex
	conns map[*net.UnixConn]*conn
}

type conn struct {
	since time.Time
	idle  bool // its request has not been read yet
}

// Listen binds the control socket at path. Its directory is created with
// mode 0700 if it is missing, and refused if anyone but this user could
// change it (see checkPrivateDir). A socket file left by a master that is
// gone is replaced; a live one means another master runs there.
func Listen(path string, log hclog.Logger) (*Server, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("control socket directory: %w", err)
	}
	if err := checkPrivateDir(dir); err != nil {
		return nil, err
	}
	// Two masters that start at once under the same name must not both
	// find the socket stale: one would remove the other's fresh socket and
	// bind its own, and both would run, one of them unreachable. The
	// check, the removal and the bind run under an exclusive lock on a
	// file beside the socket (kept: removing a lock file races with its
	// next user).
	unlock, err := lockFile(path + ".lock")
	if err != nil {
		return nil, err
	}
	defer unlock()
	taken := fmt.Errorf("control socket %s: another master is running there (give this one another --name or --control)", path)
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, taken
	} else if errors.Is(err, syscall.ECONNREFUSED) {
		os.Remove(path) // stale: nobody listens
	}
	// Bind under umask 0177 so the socket is 0600 from its first moment.
	// The umask is the process's; this runs before any worker exists.
	old := syscall.Umask(0o177)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if errors.Is(err, syscall.EADDRINUSE) {
		return nil, taken // a master whose queue is full, or a file that is not a socket
	}
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	l.SetUnlinkOnClose(false)
	return newServer(l, path, log), nil
}

// lockFile takes an exclusive flock on path (created 0600, never through a
// symlink) and returns its release.
func lockFile(path string) (func(), error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("control socket lock %s: %w", path, err)
	}
	for {
		err = unix.Flock(fd, unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("control socket lock %s: %w", path, err)
	}
	return func() { unix.Close(fd) }, nil
}

// FromFD serves the control socket a predecessor master handed over on
// descriptor fd (which it takes over, whether or not it succeeds).
func FromFD(fd int, path string, log hclog.Logger) (*Server, error) {
	f := os.NewFile(uintptr(fd), "gorolling-control")
	l, err := net.FileListener(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("inherited control socket: %w", err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, fmt.Errorf("inherited control socket is %T", l)
	}
	ul.SetUnlinkOnClose(false)
	return newServer(ul, path, log), nil
}

func newServer(l *net.UnixListener, path string, log hclog.Logger) *Server {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	s := &Server{l: l, path: path, log: log, conns: make(map[*net.UnixConn]*conn)}
	var st unix.Stat_t
	if unix.Lstat(path, &st) == nil {
		s.ino = st.Ino
	}
	return s
}

// checkPrivateDir refuses a control directory that anyone but this
// process's user could change: another user who owns it (a /tmp fallback
// created in advance, say) could replace the socket in it.
func checkPrivateDir(dir string) error {
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return fmt.Errorf("control socket directory: %w", err)
	}
	euid := os.Geteuid()
	if st.Mode&unix.S_IFMT != unix.S_IFDIR || int(st.Uid) != euid || st.Mode&0o7777 != 0o700 {
		kind := "a directory"
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			kind = "not a directory (a symlink?)"
		}
		return fmt.Errorf("control socket directory %s must be a directory owned by uid %d with mode 0700, but it is %s owned by uid %d with mode %04o: remove it or fix it, or choose another place with --control", dir, euid, kind, st.Uid, st.Mode&0o7777)
	}
	return nil
}

// Path returns the socket's path.
func (s *Server) Path() string { return s.path }

// Dup returns a close-on-exec duplicate of the listening socket, which the
// caller owns (for a successor master).
func (s *Server) Dup() (int, error) {
	rc, err := s.l.SyscallConn()
	if err != nil {
		return -1, err
	}
	d, derr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) { d, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	return d, derr
}

// Serve answers requests with h until Close, and returns nil then; the
// answers still in flight go on (see Wait).
func (s *Server) Serve(h Handler) error {
	for {
		c, err := s.l.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			time.Sleep(50 * time.Millisecond) // EMFILE and the like
			continue
		}
		if !s.admit(c) {
			writeResponse(c, Response{Error: fmt.Sprintf("busy: %d control requests are in progress; try again", maxConns)})
			c.Close()
			continue
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.forget(c)
			s.handle(c, h)
		}()
	}
}

// Close stops accepting and, with remove, removes the socket file (a
// final stop; a successor that holds the socket needs the file). It does
// not block, and it is idempotent.
func (s *Server) Close(remove bool) {
	s.l.Close()
	if !remove {
		return
	}
	// Under the lock a starting master takes, and only while the file is
	// still this server's: a master that started under the same name in
	// the meantime keeps its socket.
	unlock, err := lockFile(s.path + ".lock")
	if err != nil {
		return
	}
	defer unlock()
	var st unix.Stat_t
	if unix.Lstat(s.path, &st) == nil && st.Ino == s.ino {
		os.Remove(s.path)
	}
}

// Wait waits, at most d, for the answers in flight, so that an "upgrade
// --wait" told that this master was replaced, or stopped, hears it before
// the process exits.
func (s *Server) Wait(d time.Duration) {
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
	}
}

// admit records a new connection. At the limit it first closes the
// connection that has waited longest without sending its request; it
// reports false if every open connection is busy.
func (s *Server) admit(c *net.UnixConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.conns) >= maxConns {
		var oldest *net.UnixConn
		for x, cc := range s.conns {
			if cc.idle && (oldest == nil || cc.since.Before(s.conns[oldest].since)) {
				oldest = x
			}
		}
		if oldest == nil {
			return false
		}
		delete(s.conns, oldest)
		oldest.Close() // its handler's read fails and it returns
	}
	s.conns[c] = &conn{since: time.Now(), idle: true}
	return true
}

func (s *Server) busy(c *net.UnixConn) {
	s.mu.Lock()
	if cc := s.conns[c]; cc != nil {
		cc.idle = false
	}
	s.mu.Unlock()
}

func (s *Server) forget(c *net.UnixConn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

func (s *Server) handle(c *net.UnixConn, h Handler) {
	defer c.Close()
	cred, err := peerCred(c)
	if err != nil {
		s.log.Warn("control connection refused: no peer credentials", "error", err)
		return
	}
	if cred.Uid != 0 && int(cred.Uid) != os.Geteuid() {
		s.log.Warn("control connection refused: wrong user", events.Key, events.ControlRefused, "uid", cred.Uid, "peer_pid", cred.Pid)
		writeResponse(c, Response{Error: "permission denied: only root or the master's user may control it"})
		return
	}
	c.SetReadDeadline(time.Now().Add(requestTimeout))
	line, err := readLine(bufio.NewReaderSize(c, 4096), maxRequest)
	s.busy(c)
	if errors.Is(err, net.ErrClosed) {
		s.log.Debug("idle control connection closed to admit a newer one", "peer_pid", cred.Pid)
		return
	}
	var req Request
	if err == nil {
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.DisallowUnknownFields()
		err = dec.Decode(&req)
	}
	if err != nil {
		s.log.Warn("bad control request", "error", err, "peer_pid", cred.Pid)
		writeResponse(c, Response{Error: "bad request: " + err.Error()})
		return
	}
	c.SetReadDeadline(time.Time{})
	s.log.Debug("control request", "cmd", req.Cmd, "peer_pid", cred.Pid, "uid", cred.Uid)
	writeResponse(c, execute(req, h))
}

// execute runs one request.
func execute(req Request, h Handler) Response {
	switch req.Cmd {
	case "status":
		st := h.Status()
		return Response{OK: true, Status: &st}
	case "upgrade":
		ch, err := h.Upgrade(req.Kind)
		if err != nil {
			return Response{Error: err.Error()}
		}
		if !req.Wait {
			return Response{OK: true}
		}
		timeout := time.Duration(req.TimeoutMS) * time.Millisecond
		if timeout <= 0 {
			timeout = 24 * time.Hour
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		select {
		case out := <-ch:
			return Response{OK: out.OK, Error: out.Error, Upgrade: &out}
		case <-ctx.Done():
			return Response{Error: fmt.Sprintf("timed out after %s waiting for the upgrade; it goes on", timeout), InProgress: true}
		}
	case "scale":
		n, err := h.Scale(req.Workers, req.Delta)
		if err != nil {
			return Response{Error: err.Error()}
		}
		return Response{OK: true, Workers: n}
	case "stop":
		if err := h.Stop(); err != nil {
			return Response{Error: err.Error()}
		}
		return Response{OK: true}
	}
	return Response{Error: fmt.Sprintf("unknown command %q (want status, upgrade, scale or stop)", req.Cmd)}
}

func writeResponse(c *net.UnixConn, r Response) {
	b, _ := json.Marshal(r)
	c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	c.Write(append(b, '\n'))
}

func peerCred(c *net.UnixConn) (*unix.Ucred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, cerr
}

// readLine reads one '\n'-terminated line of at most max bytes (the last
// line may end at EOF instead).
func readLine(br *bufio.Reader, max int) ([]byte, error) {
	var line []byte
	for {
		chunk, err := br.ReadSlice('\n')
		line = append(line, chunk...)
		if len(line) > max {
			return nil, fmt.Errorf("request longer than %d bytes", max)
		}
		if err == nil {
			return line, nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			if len(line) > 0 && errors.Is(err, io.EOF) {
				return line, nil
			}
			return nil, err
		}
	}
}
