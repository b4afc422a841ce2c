// Package account owns the account workers run as (--user, --group): its
// lookup, the credential a worker is started with, and RunAs, which does
// work on the master's behalf with that account's rights so that the
// kernel, not the master, decides what a worker may have.
//
// Invariants:
//   - A nil *Account means "the master's own account": nothing switches.
//   - No goroutine other than the one RunAs starts ever runs with an
//     account's ids, and that goroutine's thread ends with it.
package account

import (
	"fmt"
	"os"
	"os/user"
	"strconv"
	"syscall"
)

// Account is the user and groups workers run as.
type Account struct {
	// User is the account's name, for messages.
	User string
	// UID and GID are its ids; GID is --group's, or the user's own.
	UID, GID uint32
	// Groups are the user's supplementary groups.
	Groups []uint32
}

// Lookup resolves --user (a name or uid) and --group (a name or gid; empty
// means the user's primary group), with the user's supplementary groups:
// starting a process with an empty list would drop every group it needs
// (ssl-cert for its keys, say). It returns nil, nil when the account is the
// one this process already runs as, so that nothing switches.
func Lookup(userSpec, groupSpec string) (*Account, error) {
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
		if n, err := strconv.ParseUint(id, 10, 32); err == nil {
			a.Groups = append(a.Groups, uint32(n))
		}
	}
	if os.Geteuid() != 0 && int(a.UID) == os.Geteuid() && int(a.GID) == os.Getegid() {
		return nil, nil // not root, and already this account: nothing to do
	}
	return a, nil
}

// Credential returns the credential to start a worker with, or nil for a
// nil account.
func (a *Account) Credential() *syscall.Credential {
	if a == nil {
		return nil
	}
	return &syscall.Credential{Uid: a.UID, Gid: a.GID, Groups: a.Groups}
}
