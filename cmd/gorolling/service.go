package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/gorolling/gorolling/master/events"
	"github.com/gorolling/gorolling/master/registry"
	"github.com/gorolling/gorolling/master/sdnotify"
	"golang.org/x/sys/unix"
)

// This file is the daemon's side of the service manager (systemd): what it
// keeps in the fd store so that a master that dies costs no connection,
// and the watchdog.
//
// A master killed by SIGKILL or the OOM killer closes nothing itself, but
// its workers drain and exit once their channel to it closes, and with the
// last copy of a listening socket gone the kernel refuses new connections
// (and resets the ones queued) until a new master binds again. systemd can
// hold a copy of each socket for the service (FDSTORE=1), however often
// its main process dies, and pass them to the next one. The master keeps
// every socket it holds there, named by its listen key, and a small state
// document (the worker count the operator set, the numbering) in a memory
// file beside them. A master started with them takes them back under the
// same keys: port-0 sockets keep their ports, connections that arrived
// meanwhile wait in the sockets' queues, and the new generation accepts
// them.
//
// Only the service's main process may speak to systemd (NotifyAccess=main):
// a successor master keeps the store once its predecessor has exited (both
// hold the same sockets until then), and a master that named its successor
// (MAINPID=) stops.

// stateBlob is the fd store name of the daemon's state document.
const stateBlob = "gorolling-state"

// savedState is what a master that dies leaves for the next one besides
// the sockets. Its JSON is read by newer masters too.
type savedState struct {
	Workers        int       `json:"workers"`
	LastGeneration int       `json:"last_generation"`
	LastWorkerID   int       `json:"last_worker_id"`
	ServiceStarted time.Time `json:"service_started"`
	MasterUpgrades int       `json:"master_upgrades"`
	MasterRestarts int       `json:"master_restarts"`
}

// readSavedState reads the state document from its descriptor (which the
// caller closes).
func readSavedState(fd int) (*savedState, error) {
	b, err := sdnotify.ReadBlob(fd)
	if err != nil {
		return nil, err
	}
	var st savedState
	// A tail of older content may follow the document (see PutBlob).
	if err := json.NewDecoder(bytes.NewReader(b)).Decode(&st); err != nil {
		return nil, fmt.Errorf("fd store: state document: %w", err)
	}
	return &st, nil
}

// wakeStore asks the service actor to bring the fd store up to date. It
// never blocks: it is called with the registry's or the master's lock held.
func (d *daemon) wakeStore() {
	select {
	case d.storeWake <- struct{}{}:
	default:
	}
}

// speaksForService reports whether systemd believes this master: it is
// the service's main process, not a successor whose predecessor still
// runs, and it has not named a successor.
func (d *daemon) speaksForService() bool {
	select {
	case <-d.self.ParentGone():
	default:
		return false
	}
	return !d.self.HandedOver()
}

// serveManager is the actor that keeps the fd store and beats the
// watchdog, until quit. Each beat is earned: it is sent only after the
// master's and the registry's locks could be taken, so a master stuck on
// either misses its beats and systemd restarts it (WatchdogSec=), which
// the fd store makes cheap.
func (d *daemon) serveManager(quit <-chan struct{}) {
	var beat <-chan time.Time
	if d.watchdog > 0 {
		// A quarter period: across a master upgrade the old master's
		// last beat and the successor's first (its first tick once it
		// took over) are then at most half a period apart.
		t := time.NewTicker(d.watchdog / 4)
		defer t.Stop()
		beat = t.C
		d.beat()
	}
	gone := d.self.ParentGone()
	for {
		select {
		case <-quit:
			return
		case <-gone:
			gone = nil
			d.syncStore()
		case <-d.storeWake:
			d.syncStore()
		case <-beat:
			d.beat()
		}
	}
}

// beat proves the master is alive to systemd's watchdog.
func (d *daemon) beat() {
	_ = d.m.Size()  // the master's lock
	_ = d.reg.Len() // the registry's lock
	// A successor beats from the moment it serves: its predecessor names
	// it main process right after, and must not find a late beat missing.
	if d.self.HandedOver() || (d.self.HasParent() && !d.mgr.TookOver()) {
		return
	}
	d.self.Notify("WATCHDOG=1")
}

// syncStore makes the fd store hold the registry's sockets and the state
// document as they are now.
func (d *daemon) syncStore() {
	if d.store == nil || !d.speaksForService() {
		return
	}
	lastGen, lastID := d.m.Counters()
	st := savedState{
		Workers: d.m.Size(), LastGeneration: lastGen, LastWorkerID: lastID,
		ServiceStarted: d.self.ServiceStarted(), MasterUpgrades: d.self.MasterUpgrades(),
		MasterRestarts: d.self.MasterRestarts(),
	}
	if st.ServiceStarted.IsZero() {
		st.ServiceStarted = d.started
	}
	b, _ := json.Marshal(st)
	if err := d.store.PutBlob(stateBlob, b); err != nil {
		d.storeFailed(err)
	}
	ents, err := d.reg.StoreEntries()
	if err != nil {
		d.storeFailed(err)
		return
	}
	want := make([]sdnotify.Entry, len(ents))
	for i, e := range ents {
		want[i] = sdnotify.Entry{Name: e.Name, FD: e.FD}
	}
	added, removed, err := d.store.Sync(want)
	for _, e := range ents {
		unix.Close(e.FD)
	}
	if err != nil {
		d.storeFailed(err)
	}
	if added+removed > 0 {
		d.log.Debug("fd store updated", events.Key, events.StoreSynced, "added", added, "removed", removed, "held", d.store.Count())
	}
}

// storeFailed logs a failure to keep the fd store, at most once a minute
// for the same message: a master that cannot keep it still serves.
func (d *daemon) storeFailed(err error) {
	msg := err.Error()
	if msg == d.storeErr && time.Since(d.storeErrAt) < time.Minute {
		return
	}
	d.storeErr, d.storeErrAt = msg, time.Now()
	lvl := "the sockets not kept are lost if the master dies"
	if errors.Is(err, sdnotify.ErrStoreFull) {
		lvl = "raise FileDescriptorStoreMax= in the unit"
	}
	d.log.Warn("fd store: "+lvl, events.Key, events.StoreFailed, "error", msg)
}

// takeInherited registers what the master was started with: sockets the
// fd store kept for it (with the state document), and any other inherited
// socket. It returns the saved state, or nil if there was none.
func (d *daemon) takeInherited() (*savedState, int, error) {
	var saved *savedState
	stored := 0
	for _, in := range registry.ScanInherited() {
		switch {
		case in.Name == stateBlob:
			st, err := readSavedState(in.FD)
			unix.Close(in.FD)
			if d.store == nil {
				d.forgetStored(in.Name)
			}
			if err != nil {
				d.log.Warn("the fd store's state document is unreadable; starting with the flags' settings", events.Key, events.StoreFailed, "error", err)
				continue
			}
			saved = st
		case registry.IsStoreName(in.Name):
			if d.store != nil {
				d.store.Assume(in.Name, in.FD)
			} else {
				d.forgetStored(in.Name)
			}
			s, err := d.reg.AdoptStored(in)
			if err != nil {
				// One socket the master cannot take back must not stop it
				// from serving the others.
				d.log.Warn("a socket from the fd store was not taken back", events.Key, events.StoreFailed, "error", err)
				continue
			}
			stored++
			d.log.Info("socket taken back from the fd store", events.Key, events.StoredAdopted, "key", s.Key.String(), "addr", s.Addr, "network", s.Network)
		case !isSocket(in.FD):
			// Not a socket and not our state document: a newer master's
			// entry, or one made by hand. Adopting it would fail the
			// start, and systemd would pass it to every restart.
			unix.Close(in.FD)
			d.log.Warn("an inherited descriptor is not a socket; closed and removed from the fd store", events.Key, events.StoreFailed, "name", in.Name, "fd", in.Number)
			d.forgetStored(in.Name)
		default:
			s, err := d.reg.Adopt(in)
			if err != nil {
				return nil, 0, err
			}
			d.log.Info("inherited socket adopted", events.Key, events.InheritedAdopted, "fd", in.Number, "addr", s.Addr, "network", s.Network, "name", in.Name)
		}
	}
	return saved, stored, nil
}

// forgetStored removes name from systemd's fd store: an entry this master
// will not keep (with --fd-store off, the sockets a master with it on
// left are taken back once, then left to this master alone).
func (d *daemon) forgetStored(name string) {
	if d.store != nil {
		_ = d.store.Forget(name)
	} else if sdnotify.ValidName(name) == nil {
		d.self.Notify("FDSTOREREMOVE=1\nFDNAME=" + name) // a no-op without systemd
	}
}

// isSocket reports whether fd is a socket.
func isSocket(fd int) bool {
	var st unix.Stat_t
	return unix.Fstat(fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFSOCK
}

// storeStatus is the fd store's size for status: -1 when none is kept.
func (d *daemon) storeStatus() int {
	if d.store == nil {
		return -1
	}
	return d.store.Count()
}

// debugStall, set only in binaries built with the gorolling_debug tag,
// starts a test hook that can freeze the master on purpose.
var debugStall func(d *daemon)
