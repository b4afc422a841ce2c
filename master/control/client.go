package control

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// DefaultPath is the control socket of the service called name, in
// DefaultDir.
func DefaultPath(name string) string {
	return filepath.Join(DefaultDir(), name+".sock")
}

// DefaultDir is where control sockets live by default: /run/gorolling for
// root, else $XDG_RUNTIME_DIR/gorolling, else gorolling-UID in the temp
// directory (which Listen refuses if someone else made it first).
func DefaultDir() string {
	if os.Geteuid() == 0 {
		return "/run/gorolling"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "gorolling")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("gorolling-%d", os.Geteuid()))
}

// ErrForeign is returned (wrapped) by Call when the socket is served by
// neither root nor this process's user.
var ErrForeign = errors.New("not a master of ours")

// PrivateDir reports whether dir is this user's own, mode 0700, and not a
// symlink: a directory another user made (a /tmp fallback created in
// advance) could hold sockets of theirs under names of their choosing.
func PrivateDir(dir string) bool { return checkPrivateDir(dir) == nil }

// SearchDirs are the directories where this user's masters keep their
// control sockets by default: DefaultDir, and for a user other than root
// the temp-directory fallback too, which a master started without
// $XDG_RUNTIME_DIR (from cron, say) uses while the operator's shell has it.
func SearchDirs() []string {
	dirs := []string{DefaultDir()}
	if os.Geteuid() != 0 {
		if fb := filepath.Join(os.TempDir(), fmt.Sprintf("gorolling-%d", os.Geteuid())); fb != dirs[0] {
			dirs = append(dirs, fb)
		}
	}
	return dirs
}

// Sockets returns the control sockets in dir (the *.sock files), sorted.
func Sockets(dir string) []string {
	matches, _ := filepath.Glob(filepath.Join(dir, "*.sock"))
	return matches
}

// Find picks a control socket: path if set; else the one of name, in the
// first of SearchDirs (that is this user's own) that has it; else the only
// socket there that a master still listens on. It looks where ls does, so
// a master ls lists under the temp-directory fallback is found by name.
func Find(path, name string) (string, error) {
	var dirs []string
	for _, d := range SearchDirs() {
		if d == DefaultDir() || PrivateDir(d) {
			dirs = append(dirs, d)
		}
	}
	return find(path, name, dirs)
}

func find(path, name string, dirs []string) (string, error) {
	if path != "" {
		return path, nil
	}
	if name != "" {
		for _, d := range dirs {
			p := filepath.Join(d, name+".sock")
			if _, err := os.Lstat(p); err == nil {
				return p, nil
			}
		}
		// Not there: connecting to the default path says so.
		return filepath.Join(dirs[0], name+".sock"), nil
	}
	var live, names []string
	for _, d := range dirs {
		for _, m := range Sockets(d) {
			// A socket file whose master died (kill -9) refuses: it is
			// not a master to choose from.
			if c, err := net.DialTimeout("unix", m, time.Second); err == nil {
				c.Close()
			} else if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
				continue
			}
			live = append(live, m)
			names = append(names, strings.TrimSuffix(filepath.Base(m), ".sock"))
		}
	}
	switch len(live) {
	case 0:
		return "", fmt.Errorf("no master found in %s (is one running? give --name or --control)", strings.Join(dirs, " or "))
	case 1:
		return live[0], nil
	}
	return "", fmt.Errorf("several masters run (%s): pick one with --name; gorolling ls lists them", strings.Join(names, ", "))
}

// Call sends one request to the master at path and returns its answer;
// wait bounds the whole exchange. It believes only a master run by root or
// by this process's user: anyone who could put a socket at the path could
// otherwise answer with whatever they like.
func Call(path string, req Request, wait time.Duration) (*Response, error) {
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("connect to the master at %s: %w", path, err)
	}
	defer c.Close()
	uc := c.(*net.UnixConn)
	cred, err := peerCred(uc)
	if err != nil {
		return nil, fmt.Errorf("check who serves %s: %w", path, err)
	}
	if cred.Uid != 0 && int(cred.Uid) != os.Geteuid() {
		return nil, fmt.Errorf("%w: the control socket %s is served by uid %d, not by root or by you (uid %d): not talking to it", ErrForeign, path, cred.Uid, os.Geteuid())
	}
	c.SetDeadline(time.Now().Add(wait))
	b, _ := json.Marshal(req)
	_, werr := c.Write(append(b, '\n'))
	// Read the answer even if the write failed: a master that refuses the
	// connection answers and closes at once.
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if werr != nil && len(line) == 0 {
		return nil, fmt.Errorf("send to the master: %w", werr)
	}
	if err != nil && len(line) == 0 {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("the master closed the connection without answering")
		}
		return nil, fmt.Errorf("read the master's answer: %w", err)
	}
	var resp Response
	if err := json.Unmarshal(line, &resp); err != nil {
		return nil, fmt.Errorf("bad answer from the master: %w", err)
	}
	return &resp, nil
}
