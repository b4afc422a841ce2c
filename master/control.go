package master

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

	"golang.org/x/sys/unix"
)

// The control socket: a unix stream socket, mode 0600 in a 0700 directory,
// that accepts connections only from root or the master's own uid
// (SO_PEERCRED). One request per connection: a JSON object on one line;
// the master answers with one JSON object on one line and closes.
//
//	{"cmd":"status"}
//	{"cmd":"upgrade","kind":"auto|workers|master","wait":true,"timeout_ms":60000}
//	{"cmd":"scale","workers":N}       or {"cmd":"scale","delta":1}
//	{"cmd":"stop"}
//
// Every answer has "ok"; a failed one has "error". See the README.

// ControlRequest is one control command.
type ControlRequest struct {
	Cmd       string `json:"cmd"`
	Kind      string `json:"kind,omitempty"`
	Wait      bool   `json:"wait,omitempty"`
	TimeoutMS int64  `json:"timeout_ms,omitempty"`
	Workers   int    `json:"workers,omitempty"`
	Delta     int    `json:"delta,omitempty"`
}

// ControlResponse is the answer to a ControlRequest.
type ControlResponse struct {
	OK      bool            `json:"ok"`
	Error   string          `json:"error,omitempty"`
	Status  *Status         `json:"status,omitempty"`
	Upgrade *UpgradeOutcome `json:"upgrade,omitempty"`
	Workers int             `json:"workers,omitempty"`
}

// UpgradeKind says what an upgrade replaces.
type UpgradeKind int

// Upgrade kinds.
const (
	// UpgradeAuto replaces the master when its binary changed on disk
	// since it started, else only the workers (SIGHUP).
	UpgradeAuto UpgradeKind = iota
	// UpgradeWorkers starts a new generation of workers.
	UpgradeWorkers
	// UpgradeMaster re-execs the master from the binary on disk (SIGUSR2).
	UpgradeMaster
)

// String returns "auto", "workers" or "master".
func (k UpgradeKind) String() string {
	switch k {
	case UpgradeWorkers:
		return "workers"
	case UpgradeMaster:
		return "master"
	}
	return "auto"
}

// ParseUpgradeKind parses "auto", "workers" or "master" ("" is auto).
func ParseUpgradeKind(s string) (UpgradeKind, error) {
	switch s {
	case "", "auto":
		return UpgradeAuto, nil
	case "workers":
		return UpgradeWorkers, nil
	case "master":
		return UpgradeMaster, nil
	}
	return 0, fmt.Errorf("unknown upgrade kind %q (want auto, workers or master)", s)
}

// UpgradeOutcome is the result of an upgrade, as the control socket
// reports it.
type UpgradeOutcome struct {
	Kind       string `json:"kind"`
	From       int    `json:"from"`
	To         int    `json:"to"`
	OK         bool   `json:"ok"`
	Error      string `json:"error,omitempty"`
	DurationMS int64  `json:"duration_ms"`
	NewPID     int    `json:"new_master_pid,omitempty"`
	// MasterError, for an automatic upgrade that rolled the workers
	// because the master upgrade failed, is why that failed.
	MasterError string `json:"master_error,omitempty"`
}

// Limits of the control server.
const (
	// maxControlRequest bounds one request line.
	maxControlRequest = 64 << 10
	// maxControlConns bounds the connections the master holds at once.
	// Past it, a new connection takes the place of the one that has waited
	// longest without sending its request; if every one is busy (an
	// "upgrade --wait", say), the newcomer is told so and closed.
	maxControlConns = 64
	// controlRequestTimeout bounds the wait for a connection's request.
	controlRequestTimeout = 5 * time.Second
)

type controlServer struct {
	m    *Master
	l    *net.UnixListener
	path string
	wg   sync.WaitGroup // connections being answered

	mu    sync.Mutex
	conns map[*net.UnixConn]*controlConn // open connections
}

// controlConn is the state of one open control connection.
type controlConn struct {
	since time.Time
	idle  bool // its request has not been read yet
}

// wait waits (at most d) for the connections being answered.
func (c *controlServer) wait(d time.Duration) {
	done := make(chan struct{})
	go func() { c.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
	}
}

// DefaultControlPath is the control socket of the service called name: in
// /run/gorolling for root, else in $XDG_RUNTIME_DIR/gorolling, else in
// the temp directory under a per-user directory.
func DefaultControlPath(name string) string {
	return filepath.Join(DefaultControlDir(), name+".sock")
}

// DefaultControlDir is the directory of DefaultControlPath.
func DefaultControlDir() string {
	if os.Geteuid() == 0 {
		return "/run/gorolling"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "gorolling")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("gorolling-%d", os.Geteuid()))
}

// openControl binds the control socket, or takes over the predecessor's
// (fd >= 0, from a self-upgrade).
func (m *Master) openControl(path string, inheritedFD int) error {
	if inheritedFD >= 0 {
		f := os.NewFile(uintptr(inheritedFD), "gorolling-control")
		l, err := net.FileListener(f)
		f.Close()
		if err == nil {
			ul := l.(*net.UnixListener)
			ul.SetUnlinkOnClose(false)
			m.control = newControlServer(m, ul, path)
			go m.control.serve()
			return nil
		}
		m.log.Warn("inherited control socket unusable; binding a new one", "error", err)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("control socket directory: %w", err)
	}
	if err := checkPrivateDir(dir); err != nil {
		return err
	}
	if err := clearStaleUnix("unix", path); err != nil {
		return fmt.Errorf("control socket %s: another master is running there (give this one another --name or --control)", path)
	}
	// Bind under umask 0177 so the socket is 0600 from its first moment.
	old := syscall.Umask(0o177)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	l.SetUnlinkOnClose(false)
	m.control = newControlServer(m, l, path)
	go m.control.serve()
	return nil
}

func newControlServer(m *Master, l *net.UnixListener, path string) *controlServer {
	return &controlServer{m: m, l: l, path: path, conns: make(map[*net.UnixConn]*controlConn)}
}

// checkPrivateDir refuses a control directory that anyone but the
// master's user could change: another user who owns it (a /tmp fallback
// created in advance, say) could replace the socket in it, or read the
// name of every master.
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

// ControlPath returns the control socket's path, or "".
func (m *Master) ControlPath() string {
	if m.control == nil {
		return ""
	}
	return m.control.path
}

func (c *controlServer) rawFD() (int, bool) {
	rc, err := c.l.SyscallConn()
	if err != nil {
		return -1, false
	}
	fd := -1
	if rc.Control(func(x uintptr) { fd = int(x) }) != nil {
		return -1, false
	}
	return fd, fd >= 0
}

// close stops serving; with remove it also removes the socket file.
func (c *controlServer) close(remove bool) {
	c.l.Close()
	if remove {
		os.Remove(c.path)
	}
}

func (c *controlServer) serve() {
	for {
		conn, err := c.l.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if !c.admit(conn) {
			writeResponse(conn, ControlResponse{Error: fmt.Sprintf("busy: %d control requests are in progress; try again", maxControlConns)})
			conn.Close()
			continue
		}
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			defer c.forget(conn)
			c.handle(conn)
		}()
	}
}

// admit records a new connection. At the limit it first closes the
// connection that has waited longest without sending its request; it
// reports false if every open connection is busy.
func (c *controlServer) admit(conn *net.UnixConn) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.conns) >= maxControlConns {
		var oldest *net.UnixConn
		for x, cc := range c.conns {
			if cc.idle && (oldest == nil || cc.since.Before(c.conns[oldest].since)) {
				oldest = x
			}
		}
		if oldest == nil {
			return false
		}
		delete(c.conns, oldest)
		oldest.Close() // its handler's read fails and it returns
	}
	c.conns[conn] = &controlConn{since: time.Now(), idle: true}
	return true
}

// busy marks a connection whose request has been read.
func (c *controlServer) busy(conn *net.UnixConn) {
	c.mu.Lock()
	if cc := c.conns[conn]; cc != nil {
		cc.idle = false
	}
	c.mu.Unlock()
}

func (c *controlServer) forget(conn *net.UnixConn) {
	c.mu.Lock()
	delete(c.conns, conn)
	c.mu.Unlock()
}

func (c *controlServer) handle(conn *net.UnixConn) {
	defer conn.Close()
	log := c.m.log.Named("control")
	cred, err := peerCred(conn)
	if err != nil {
		log.Warn("control connection refused: no peer credentials", "error", err)
		return
	}
	if cred.Uid != 0 && int(cred.Uid) != os.Geteuid() {
		log.Warn("control connection refused: wrong user", "uid", cred.Uid, "peer_pid", cred.Pid)
		writeResponse(conn, ControlResponse{Error: "permission denied: only root or the master's user may control it"})
		return
	}
	conn.SetReadDeadline(time.Now().Add(controlRequestTimeout))
	br := bufio.NewReaderSize(conn, 4096)
	line, err := readLine(br, maxControlRequest)
	c.busy(conn)
	if errors.Is(err, net.ErrClosed) {
		log.Debug("idle control connection closed to admit a newer one", "peer_pid", cred.Pid)
		return
	}
	if err != nil {
		log.Warn("bad control request", "error", err, "peer_pid", cred.Pid)
		writeResponse(conn, ControlResponse{Error: "bad request: " + err.Error()})
		return
	}
	var req ControlRequest
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		log.Warn("bad control request", "error", err, "peer_pid", cred.Pid)
		writeResponse(conn, ControlResponse{Error: "bad request: " + err.Error()})
		return
	}
	conn.SetReadDeadline(time.Time{})
	log.Debug("control request", "cmd", req.Cmd, "peer_pid", cred.Pid, "uid", cred.Uid)
	writeResponse(conn, c.m.control1(req, conn))
}

// control1 executes one request.
func (m *Master) control1(req ControlRequest, conn *net.UnixConn) ControlResponse {
	switch req.Cmd {
	case "status":
		st := m.Status()
		return ControlResponse{OK: true, Status: &st}
	case "upgrade":
		kind, err := ParseUpgradeKind(req.Kind)
		if err != nil {
			return ControlResponse{Error: err.Error()}
		}
		m.mu.Lock()
		up := m.hooks.Upgrade
		m.mu.Unlock()
		if up == nil || m.Stopping() {
			return ControlResponse{Error: "the master is not accepting upgrades now (starting or stopping)"}
		}
		m.log.Info("upgrade requested", "via", "control", "kind", kind.String())
		ch := up(kind)
		if !req.Wait {
			return ControlResponse{OK: true}
		}
		timeout := time.Duration(req.TimeoutMS) * time.Millisecond
		if timeout <= 0 {
			timeout = 24 * time.Hour
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		select {
		case out := <-ch:
			return ControlResponse{OK: out.OK, Error: out.Error, Upgrade: &out}
		case <-ctx.Done():
			return ControlResponse{Error: fmt.Sprintf("timed out after %s waiting for the upgrade; it goes on", timeout)}
		}
	case "scale":
		n := req.Workers
		if req.Delta != 0 {
			n = m.Size() + req.Delta
		}
		if err := m.Scale(n); err != nil {
			return ControlResponse{Error: err.Error()}
		}
		return ControlResponse{OK: true, Workers: n}
	case "stop":
		select {
		case m.stopReq <- struct{}{}:
		default:
		}
		return ControlResponse{OK: true}
	}
	return ControlResponse{Error: fmt.Sprintf("unknown command %q (want status, upgrade, scale or stop)", req.Cmd)}
}

func writeResponse(conn *net.UnixConn, r ControlResponse) {
	b, _ := json.Marshal(r)
	conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
	conn.Write(append(b, '\n'))
}

func peerCred(conn *net.UnixConn) (*unix.Ucred, error) {
	rc, err := conn.SyscallConn()
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

// readLine reads one '\n'-terminated line of at most max bytes.
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
