// Package control owns the master's control socket: the protocol (one
// JSON request per connection, one JSON answer), the server that accepts
// and bounds connections and checks who is asking, and the client the
// gorolling commands use.
//
// The socket is a unix stream socket, mode 0600, in a directory that must
// belong to the master's user with mode 0700. One request per connection:
// a JSON object on one line; the master answers with one JSON object on one
// line and closes.
//
//	{"cmd":"status"}
//	{"cmd":"upgrade","kind":"auto|workers|master","wait":true,"timeout_ms":60000}
//	{"cmd":"scale","workers":N}       or {"cmd":"scale","delta":1}
//	{"cmd":"stop"}
//
// Every answer has "ok"; a failed one has "error".
//
// Invariants:
//   - The server answers only root and the master's own uid (SO_PEERCRED);
//     the client believes only a server run by root or by its own uid.
//   - At most maxConns connections are open at once; the one that has
//     waited longest without sending its request makes room for a new one.
//   - The package knows nothing about workers or upgrades: a Handler does
//     the work.
package control

import (
	"strings"
	"time"
	"unicode/utf8"
)

// Printable returns s without control characters (C0, DEL, C1) or invalid
// UTF-8, cut to at most max bytes: text that workers choose (STATUS=, unix
// socket paths) reaches operators' terminals through status and the log.
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

// Request is one control command.
type Request struct {
	Cmd       string `json:"cmd"`
	Kind      string `json:"kind,omitempty"`
	Wait      bool   `json:"wait,omitempty"`
	TimeoutMS int64  `json:"timeout_ms,omitempty"`
	Workers   int    `json:"workers,omitempty"`
	Delta     int    `json:"delta,omitempty"`
}

// Response is the answer to a Request.
type Response struct {
	OK      bool            `json:"ok"`
	Error   string          `json:"error,omitempty"`
	Status  *Status         `json:"status,omitempty"`
	Upgrade *UpgradeOutcome `json:"upgrade,omitempty"`
	Workers int             `json:"workers,omitempty"`
	// InProgress, with an error, says the wait timed out while the
	// upgrade goes on: neither taken over nor rolled back yet.
	InProgress bool `json:"in_progress,omitempty"`
}

// UpgradeOutcome is the result of an upgrade.
type UpgradeOutcome struct {
	Kind       string `json:"kind"`
	From       int    `json:"from"`
	To         int    `json:"to"`
	OK         bool   `json:"ok"`
	Error      string `json:"error,omitempty"`
	DurationMS int64  `json:"duration_ms"`
	NewPID     int    `json:"new_master_pid,omitempty"`
	// MasterError, for an automatic upgrade that rolled the workers
	// because the master upgrade it tried first failed, is why that failed.
	MasterError string `json:"master_error,omitempty"`
}

// Status is a snapshot of a master, as "gorolling status --json" prints it.
type Status struct {
	PID            int       `json:"pid"`
	Version        string    `json:"version"`
	Program        string    `json:"program"`
	Started        time.Time `json:"started"`
	UptimeSec      float64   `json:"uptime_seconds"`
	ServiceStarted time.Time `json:"service_started"`
	MasterUpgrades int       `json:"master_upgrades"`
	// MasterRestarts counts the masters of this service that died and
	// whose sockets a new master took back from systemd's fd store.
	MasterRestarts int `json:"master_restarts"`
	// FDStore is how many sockets systemd's fd store holds for the
	// service, as far as the master knows; -1 when it keeps none.
	FDStore    int `json:"fd_store"`
	Workers    int `json:"workers"`
	Generation int `json:"generation"` // the serving one, 0 if none
	// ConnsHandedOver counts the connections this master relayed from a
	// draining worker to one that took them; ConnsReturned those no
	// worker took, which their sender finished itself.
	ConnsHandedOver int64  `json:"conns_handed_over"`
	ConnsReturned   int64  `json:"conns_returned"`
	Upgrade         string `json:"upgrade"` // what an upgrade in progress is doing, or ""
	ControlPath     string `json:"control"`
	// MasterUpgradeFailure is the last master upgrade that failed, if the
	// master has not been replaced since.
	MasterUpgradeFailure *MasterUpgradeFailure `json:"master_upgrade_failure,omitempty"`
	Processes            []WorkerStatus        `json:"processes"`
	Listeners            []ListenerStatus      `json:"listeners"`
}

// MasterUpgradeFailure describes a failed master self-upgrade.
type MasterUpgradeFailure struct {
	Binary string    `json:"binary"` // the gorolling binary tried
	Error  string    `json:"error"`
	At     time.Time `json:"at"`
}

// WorkerStatus describes one live worker.
type WorkerStatus struct {
	Generation int     `json:"generation"`
	GenState   string  `json:"generation_state"`
	Slot       int     `json:"slot"`
	ID         int     `json:"id"`
	PID        int     `json:"pid"`
	State      string  `json:"state"`
	UptimeSec  float64 `json:"uptime_seconds"`
	Restarts   int     `json:"restarts"`
	Status     string  `json:"status,omitempty"` // the last STATUS= it sent
}

// ListenerStatus describes one socket of the registry.
type ListenerStatus struct {
	Key         string `json:"key"`
	Network     string `json:"network"`
	Address     string `json:"address"`
	Name        string `json:"name,omitempty"`
	Kind        string `json:"kind"` // shared, pre-opened, inherited
	Generations []int  `json:"generations"`
}
