package master

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"syscall"
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

// chown gives a file the master created for workers to their account.
func (a *Account) chown(path string) error {
	if a == nil || os.Geteuid() != 0 {
		return nil
	}
	return os.Lchown(path, int(a.UID), int(a.GID))
}
