package master

import (
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/gorolling/gorolling/handoff"
	"golang.org/x/sys/unix"
)

// Account is the user and groups workers run as (--user, --group).
type Account struct {
	User   string
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups
}

// LookupAccount resolves --user (a name or uid) and --group (a name or
// gid; empty means the user's primary group). The supplementary groups are
// the user's own (PITFALLS #22: an empty list would drop them all).
func LookupAccount(userSpec, groupSpec string) (*Account, error) {
	u, err := user.Lookup(userSpec)
	if err != nil {
		if _, nerr := strconv.Atoi(userSpec); nerr == nil {
			u, err = user.LookupId(userSpec)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("--user %q: %w", userSpec, err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	if groupSpec != "" {
		g, err := user.LookupGroup(groupSpec)
		if err != nil {
			if _, nerr := strconv.Atoi(groupSpec); nerr == nil {
				g, err = user.LookupGroupId(groupSpec)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("--group %q: %w", groupSpec, err)
		}
		gid, _ = strconv.ParseUint(g.Gid, 10, 32)
	}
	a := &Account{User: u.Username, UID: uint32(uid), GID: uint32(gid)}
	ids, err := u.GroupIds()
	if err != nil {
		return nil, fmt.Errorf("--user %q: supplementary groups: %w", userSpec, err)
	}
	for _, id := range ids {
		n, err := strconv.ParseUint(id, 10, 32)
		if err == nil {
			a.Groups = append(a.Groups, uint32(n))
		}
	}
	return a, nil
}

// credential returns the SysProcAttr credential for workers, or nil when
// the account is the master's own and nothing needs changing.
func (a *Account) credential() *syscall.Credential {
	if a == nil {
		return nil
	}
	if os.Geteuid() != 0 && int(a.UID) == os.Geteuid() && int(a.GID) == os.Getegid() {
		return nil // a non-root master cannot call setgroups; nothing to do
	}
	return &syscall.Credential{Uid: a.UID, Gid: a.GID, Groups: a.Groups}
}

// mayAsk refuses, with EACCES, a socket the account could not open by
// itself: a port below net.ipv4.ip_unprivileged_port_start, or a unix
// socket in a directory it cannot write. The master checks it only for
// sockets it does not hold yet, so pre-declared (--listen) and inherited
// sockets stay available.
func (a *Account) mayAsk(k handoff.Key) error {
	if a == nil || a.UID == 0 {
		return nil
	}
	switch {
	case k.Network == "fd":
		return nil // the operator handed these in
	case strings.HasPrefix(k.Network, "unix"):
		if strings.HasPrefix(k.Address, "@") {
			return nil
		}
		if !a.canWriteDir(filepath.Dir(k.Address)) {
			return &Error{Errno: unix.EACCES, Msg: fmt.Sprintf("listen %s %s: permission denied: user %s may not create files in %s (pre-declare the socket with --listen)", k.Network, k.Address, a.User, filepath.Dir(k.Address))}
		}
	default:
		if p := k.Port(); p > 0 && p < unprivilegedPortStart() {
			return &Error{Errno: unix.EACCES, Msg: fmt.Sprintf("listen %s %s: permission denied: port %d is privileged and workers run as %s; pre-declare it with --listen", k.Network, k.Address, p, a.User)}
		}
	}
	return nil
}

// canWriteDir checks write and search permission on dir as the account
// would have it (owner, group, other bits; root's override does not apply).
func (a *Account) canWriteDir(dir string) bool {
	var st unix.Stat_t
	if unix.Stat(dir, &st) != nil {
		return false
	}
	const w, x = 0o2, 0o1
	perm := st.Mode & 0o7
	switch {
	case st.Uid == a.UID:
		perm = (st.Mode >> 6) & 0o7
	case st.Gid == a.GID || containsGID(a.Groups, st.Gid):
		perm = (st.Mode >> 3) & 0o7
	}
	return perm&(w|x) == w|x
}

func containsGID(gs []uint32, g uint32) bool {
	for _, x := range gs {
		if x == g {
			return true
		}
	}
	return false
}

// unprivilegedPortStart is the lowest port an unprivileged process may
// bind (net.ipv4.ip_unprivileged_port_start, 1024 by default).
func unprivilegedPortStart() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start")
	if err != nil {
		return 1024
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 1024
	}
	return n
}

// chown gives a file the master created for workers to their account.
func (a *Account) chown(path string) error {
	if a == nil || os.Geteuid() != 0 {
		return nil
	}
	return os.Lchown(path, int(a.UID), int(a.GID))
}
