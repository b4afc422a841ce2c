package master

import (
	"fmt"
	"sort"
	"time"

	"github.com/gorolling/gorolling/handoff"
	"golang.org/x/sys/unix"
)

// State is what a master hands over to the master that replaces it in a
// self-upgrade, besides the sockets themselves: enough to keep Node's
// semantics across the change (every key, the port-0 assignments, which
// sockets are pre-opened and in what order, inherited sockets under their
// original fd numbers, which unix socket files the master owns) and to keep
// generation numbers and worker ids increasing.
type State struct {
	LastGeneration int           `json:"last_generation"`
	LastWorkerID   int           `json:"last_worker_id"`
	ServiceStarted time.Time     `json:"service_started"`
	MasterUpgrades int           `json:"master_upgrades"`
	Sockets        []SocketState `json:"sockets"`
	Ports          []PortState   `json:"ports"`
}

// SocketState describes one socket of a State; the socket itself travels
// as the descriptor at the same index.
type SocketState struct {
	Key          handoff.Key `json:"key"`
	Network      string      `json:"network"`
	Addr         string      `json:"addr"`
	Name         string      `json:"name,omitempty"`
	Persistent   bool        `json:"persistent,omitempty"`
	PreopenIndex int         `json:"preopen_index"` // LISTEN_FDS position, or -1
	Packet       bool        `json:"packet,omitempty"`
	Path         string      `json:"path,omitempty"`
	Ino          uint64      `json:"ino,omitempty"`
	Control      bool        `json:"control,omitempty"` // the control socket
}

// PortState is one port-0 assignment.
type PortState struct {
	Key  handoff.Key `json:"key"`
	Port int         `json:"port"`
}

// Restore is a State with its sockets, for Config.Restore.
type Restore struct {
	State State
	// FDs are the sockets, in State.Sockets order; New takes them over.
	FDs []int
}

// ExportState returns the master's state and duplicates of its sockets'
// descriptors (close-on-exec), which the caller closes: they stay valid
// however long the transfer takes, whatever the master closes meanwhile.
func (m *Master) ExportState() (State, []int, error) {
	m.mu.Lock()
	st := State{
		LastGeneration: m.lastGen,
		LastWorkerID:   m.nextID,
		ServiceStarted: m.serviceStarted,
		MasterUpgrades: m.masterUpgrades,
	}
	m.mu.Unlock()
	var fds []int
	r := m.reg
	r.mu.Lock()
	for _, s := range r.sockets {
		ss := SocketState{
			Key: s.Key, Network: s.Network, Addr: s.Addr, Name: s.Name,
			Persistent: s.Persistent, PreopenIndex: -1, Packet: s.packet,
			Path: s.path, Ino: s.ino,
		}
		for i, p := range m.preopened {
			if p == s {
				ss.PreopenIndex = i
			}
		}
		fd, err := unix.FcntlInt(uintptr(s.fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			r.mu.Unlock()
			for _, x := range fds {
				unix.Close(x)
			}
			return State{}, nil, fmt.Errorf("export the state: dup socket %s: %w", s.Key, err)
		}
		st.Sockets = append(st.Sockets, ss)
		fds = append(fds, fd)
	}
	for k, p := range r.ports {
		st.Ports = append(st.Ports, PortState{Key: k, Port: p})
	}
	r.mu.Unlock()
	if c := m.control; c != nil {
		if fd, ok := c.rawFD(); ok {
			if dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0); err == nil {
				st.Sockets = append(st.Sockets, SocketState{Network: "unix", Addr: c.path, Path: c.path, Control: true, PreopenIndex: -1})
				fds = append(fds, dup)
			}
		}
	}
	return st, fds, nil
}

// restore takes over a predecessor's sockets. Called from New.
func (m *Master) restore(rs *Restore) (controlFD int, err error) {
	controlFD = -1
	if len(rs.FDs) != len(rs.State.Sockets) {
		return -1, fmt.Errorf("master: restore: %d sockets described, %d received", len(rs.State.Sockets), len(rs.FDs))
	}
	st := rs.State
	m.lastGen, m.nextID = st.LastGeneration, st.LastWorkerID
	m.serviceStarted, m.masterUpgrades = st.ServiceStarted, st.MasterUpgrades+1
	type pre struct {
		i int
		s *Socket
	}
	var pres []pre
	r := m.reg
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, ss := range st.Sockets {
		fd := rs.FDs[i]
		unix.CloseOnExec(fd)
		if ss.Control {
			controlFD = fd
			continue
		}
		s := &Socket{
			Key: ss.Key, Network: ss.Network, Addr: ss.Addr, Name: ss.Name,
			Persistent: ss.Persistent, fd: fd, path: ss.Path, ino: ss.Ino,
			packet: ss.Packet, preopened: ss.PreopenIndex >= 0,
		}
		if s.path != "" && !s.preopened {
			// Opened for the workers: its file is theirs to remove.
			s.owner = r.owner
		}
		lookup := ss.Key
		if lookup.Network == "fd" {
			lookup.Packet = false
		}
		r.sockets[lookup] = s
		if ss.PreopenIndex >= 0 {
			pres = append(pres, pre{ss.PreopenIndex, s})
		}
	}
	for _, p := range st.Ports {
		r.ports[p.Key] = p.Port
	}
	sort.Slice(pres, func(a, b int) bool { return pres[a].i < pres[b].i })
	for _, p := range pres {
		m.preopened = append(m.preopened, p.s)
	}
	return controlFD, nil
}
