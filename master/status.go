package master

import (
	"os"
	"sort"
	"time"
)

// Status is a snapshot of a master, as "gorolling status --json" prints it.
type Status struct {
	PID            int       `json:"pid"`
	Version        string    `json:"version"`
	Program        string    `json:"program"`
	Started        time.Time `json:"started"`
	UptimeSec      float64   `json:"uptime_seconds"`
	ServiceStarted time.Time `json:"service_started"`
	MasterUpgrades int       `json:"master_upgrades"`
	Workers        int       `json:"workers"`
	Generation     int       `json:"generation"` // the serving one, 0 if none
	Upgrade        string    `json:"upgrade"`    // what an upgrade in progress is doing, or ""
	ControlPath    string    `json:"control"`
	// MasterUpgradeFailure is the last master upgrade that failed, if the
	// master has not been replaced since.
	MasterUpgradeFailure *MasterUpgradeFailure `json:"master_upgrade_failure,omitempty"`
	Processes            []WorkerStatus        `json:"processes"`
	Listeners            []ListenerStatus      `json:"listeners"`
}

// MasterUpgradeFailure describes a failed master self-upgrade.
type MasterUpgradeFailure struct {
	// Binary is the gorolling binary that was tried.
	Binary string `json:"binary"`
	// Error is why it failed.
	Error string `json:"error"`
	// At is when.
	At time.Time `json:"at"`
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

// ListenerStatus describes one registry socket.
type ListenerStatus struct {
	Key         string `json:"key"`
	Network     string `json:"network"`
	Address     string `json:"address"`
	Name        string `json:"name,omitempty"`
	Kind        string `json:"kind"` // shared, pre-opened, inherited
	Generations []int  `json:"generations"`
}

// Status returns a snapshot of the master.
func (m *Master) Status() Status {
	now := time.Now()
	m.mu.Lock()
	st := Status{
		PID:                  os.Getpid(),
		Version:              m.cfg.Version,
		Program:              m.cfg.Program,
		Started:              m.started,
		UptimeSec:            now.Sub(m.started).Seconds(),
		ServiceStarted:       m.serviceStarted,
		MasterUpgrades:       m.masterUpgrades,
		Workers:              m.workers,
		Upgrade:              m.upgradeNote,
		ControlPath:          m.ControlPath(),
		MasterUpgradeFailure: m.masterFailure,
	}
	if m.serving != nil {
		st.Generation = m.serving.Num
	}
	held := map[string]map[int]bool{}
	for _, g := range m.gens {
		for _, s := range g.slots {
			w := s.w
			if w == nil || w.state == WorkerExited {
				continue
			}
			st.Processes = append(st.Processes, WorkerStatus{
				Generation: g.Num, GenState: g.state.String(), Slot: s.index, ID: w.ID, PID: w.pid,
				State: w.state.String(), UptimeSec: now.Sub(w.spawnedAt).Seconds(),
				Restarts: s.restarts, Status: w.status,
			})
			for k := range w.keys {
				ks := k.String()
				if held[ks] == nil {
					held[ks] = map[int]bool{}
				}
				held[ks][g.Num] = true
			}
		}
	}
	var liveGens []int
	for _, g := range m.gens {
		liveGens = append(liveGens, g.Num)
	}
	m.mu.Unlock()
	for _, s := range m.reg.Sockets() {
		ls := ListenerStatus{Key: s.Key.String(), Network: s.Network, Address: s.Addr, Name: s.Name, Kind: "shared", Generations: []int{}}
		switch {
		case s.preopened:
			ls.Kind = "pre-opened"
		case s.Persistent:
			ls.Kind = "inherited"
		}
		if s.preopened {
			ls.Generations = append(ls.Generations, liveGens...) // every worker gets it
		} else {
			for g := range held[ls.Key] {
				ls.Generations = append(ls.Generations, g)
			}
			sort.Ints(ls.Generations)
		}
		st.Listeners = append(st.Listeners, ls)
	}
	sort.Slice(st.Processes, func(i, j int) bool {
		a, b := st.Processes[i], st.Processes[j]
		if a.Generation != b.Generation {
			return a.Generation < b.Generation
		}
		return a.Slot < b.Slot
	})
	return st
}

// SetMasterUpgradeFailure records the last failed master upgrade, for
// Status.
func (m *Master) SetMasterUpgradeFailure(f *MasterUpgradeFailure) {
	m.mu.Lock()
	m.masterFailure = f
	m.mu.Unlock()
}

// SetUpgradeNote records what an upgrade in progress is doing, for Status.
func (m *Master) SetUpgradeNote(s string) {
	m.mu.Lock()
	m.upgradeNote = s
	m.mu.Unlock()
}
