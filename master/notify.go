package master

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// notifySock is one worker's NOTIFY_SOCKET: a datagram socket in the
// master's private runtime directory. Messages are attributed by socket
// (each worker has its own, PITFALLS #6) and checked by the sender's
// credentials, so one worker cannot mark another ready.
type notifySock struct {
	conn *net.UnixConn
	path string
	once sync.Once
}

func (m *Master) openNotify(id int) (*notifySock, error) {
	path := filepath.Join(m.runDir, "notify-"+strconv.Itoa(id)+".sock")
	_ = os.Remove(path) // a leftover of a previous master using the same directory
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	rc, err := c.SyscallConn()
	if err == nil {
		var serr error
		err = rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
		})
		if err == nil {
			err = serr
		}
	}
	if err != nil {
		c.Close()
		os.Remove(path)
		return nil, fmt.Errorf("notify socket: SO_PASSCRED: %w", err)
	}
	if err := m.cfg.Account.chown(path); err != nil {
		c.Close()
		os.Remove(path)
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	return &notifySock{conn: c, path: path}, nil
}

func (n *notifySock) close() {
	n.once.Do(func() {
		n.conn.Close()
		os.Remove(n.path)
	})
}

// A worker's notify socket is read at up to notifyRate datagrams a
// second, after a burst of notifyBurst; a faster sender is read more
// slowly, so its datagrams queue in the kernel (and its sends block or
// fail) instead of costing the master.
const (
	notifyBurst = 100
	notifyRate  = 50
)

// readNotify handles sd_notify datagrams until the socket closes.
func (w *Worker) readNotify() {
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred)+unix.CmsgSpace(4*16))
	tokens, last := float64(notifyBurst), time.Now()
	for {
		refill := func() {
			now := time.Now()
			tokens = min(tokens+now.Sub(last).Seconds()*notifyRate, notifyBurst)
			last = now
		}
		if refill(); tokens < 1 {
			w.warnOnce("notify-flood", "worker floods its notify socket; reading it more slowly", "rate_per_second", notifyRate)
			time.Sleep(time.Duration((1 - tokens) / notifyRate * float64(time.Second)))
			refill()
		}
		tokens--
		n, oobn, flags, _, err := w.notify.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		var cred *unix.Ucred
		if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, cm := range msgs {
				if fds, err := unix.ParseUnixRights(&cm); err == nil {
					// FDSTORE= is not supported: do not keep what came.
					for _, fd := range fds {
						unix.Close(fd)
					}
				} else if c, err := unix.ParseUnixCredentials(&cm); err == nil {
					cred = c
				}
			}
		}
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
			w.log.Warn("notify message truncated; ignored")
			continue
		}
		if cred == nil {
			w.log.Warn("notify message without credentials; ignored")
			continue
		}
		if !w.owns(int(cred.Pid)) {
			w.log.Warn("notify message from a process outside this worker; ignored", "sender_pid", cred.Pid)
			continue
		}
		w.handleNotify(string(buf[:n]), int(cred.Pid))
	}
}

// owns reports whether pid is the worker or one of its descendants. A
// sender that has already exited (systemd-notify does, at once) cannot be
// checked and is accepted: the message came through this worker's own
// socket.
func (w *Worker) owns(pid int) bool {
	if pid == w.pid {
		return true
	}
	for i := 0; i < 64 && pid > 1; i++ {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			return i == 0 // the sender itself is gone: accept
		}
		s := string(b)
		j := strings.LastIndexByte(s, ')')
		if j < 0 {
			return false
		}
		f := strings.Fields(s[j+1:])
		if len(f) < 3 {
			return false
		}
		ppid, _ := strconv.Atoi(f[1])
		pgrp, _ := strconv.Atoi(f[2])
		if pgrp == w.pid || ppid == w.pid {
			return true
		}
		pid = ppid
	}
	return false
}

// handleNotify applies one sd_notify message: newline-separated KEY=VALUE
// assignments; unknown keys are ignored.
func (w *Worker) handleNotify(msg string, sender int) {
	for _, line := range strings.Split(msg, "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		switch k {
		case "READY":
			if v == "1" {
				w.m.workerReady(w, "notify")
			}
		case "STOPPING":
			if v == "1" {
				w.log.Info("worker stopping", "sender_pid", sender)
			}
		case "STATUS":
			v = Printable(v, maxStatusLen)
			w.m.mu.Lock()
			changed := w.status != v
			w.status = v
			w.m.mu.Unlock()
			if changed {
				w.log.Info("worker status", "status", v)
			}
		default:
			w.log.Trace("notify field ignored", "key", k)
		}
	}
}

// maxStatusLen bounds the STATUS= text kept for a worker.
const maxStatusLen = 256

// Printable returns s without control characters (C0, DEL, C1) or invalid
// UTF-8, cut to at most max bytes: a worker's text reaches operators'
// terminals through status and the log.
func Printable(s string, max int) string {
	var b strings.Builder
	for _, r := range s {
		if r == utf8.RuneError || r < 0x20 || (r >= 0x7f && r < 0xa0) {
			continue
		}
		if b.Len()+utf8.RuneLen(r) > max {
			break
		}
		b.WriteRune(r)
	}
	return b.String()
}
