package registry

import (
	"fmt"
	"sort"

	"github.com/gorolling/gorolling/handoff"
	"golang.org/x/sys/unix"
)

// State is what a registry hands to the registry of the master that
// replaces it, besides the sockets themselves: enough to keep the listen
// semantics across the change (every key, the port-0 assignments, which
// sockets are pre-opened and in what order, inherited sockets under their
// original fd numbers, which unix socket files the registry created). Its
// JSON is part of the self-upgrade protocol: a newer master must read what
// an older one wrote.
type State struct {
	Sockets []SocketState `json:"sockets"`
	Ports   []PortState   `json:"ports"`
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
	// Spec is a --listen socket's key as its spec gave it (port 0 stays
	// 0), if it differs from Key.
	Spec *handoff.Key `json:"spec,omitempty"`
}

// PortState is one port-0 assignment.
type PortState struct {
	Key  handoff.Key `json:"key"`
	Port int         `json:"port"`
}

// Export returns the registry's state and duplicates of its sockets'
// descriptors (close-on-exec, in State.Sockets order), which the caller
// closes: they stay valid however long a transfer takes, whatever the
// registry closes meanwhile.
func (r *Registry) Export() (State, []int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var st State
	var fds []int
	for _, s := range r.sockets {
		ss := SocketState{
			Key: s.Key, Network: s.Network, Addr: s.Addr, Name: s.Name,
			Persistent: s.persistent, PreopenIndex: -1, Packet: s.packet,
			Path: s.path, Ino: s.ino,
		}
		if s.preopened && s.spec != s.Key && s.Key.Network != "fd" {
			spec := s.spec
			ss.Spec = &spec
		}
		for i, p := range r.preopened {
			if p == s {
				ss.PreopenIndex = i
			}
		}
		fd, err := unix.FcntlInt(uintptr(s.fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			closeAll(fds)
			return State{}, nil, fmt.Errorf("export the registry: dup socket %s: %w", s.Key, err)
		}
		st.Sockets = append(st.Sockets, ss)
		fds = append(fds, fd)
	}
	for k, p := range r.ports {
		st.Ports = append(st.Ports, PortState{Key: k, Port: p})
	}
	return st, fds, nil
}

// Restore returns a registry that holds a predecessor's sockets: fds[i] is
// the socket st.Sockets[i] describes, and the registry takes every one of
// them over (they are closed if Restore fails).
func Restore(opt Options, st State, fds []int) (*Registry, error) {
	if len(fds) != len(st.Sockets) {
		closeAll(fds)
		return nil, fmt.Errorf("registry: restore: %d sockets described, %d received", len(st.Sockets), len(fds))
	}
	r := New(opt)
	type pre struct {
		i int
		s *Socket
	}
	var pres []pre
	for i, ss := range st.Sockets {
		unix.CloseOnExec(fds[i])
		s := &Socket{
			Key: ss.Key, Network: ss.Network, Addr: ss.Addr, Name: ss.Name,
			persistent: ss.Persistent, fd: fds[i], path: ss.Path, ino: ss.Ino,
			packet: ss.Packet, preopened: ss.PreopenIndex >= 0,
		}
		if s.path != "" && !s.preopened {
			s.owner = opt.Owner // opened for the workers: theirs to remove
		}
		s.spec = ss.Key
		if ss.Spec != nil {
			s.spec = *ss.Spec
		}
		r.sockets[lookup(ss.Key)] = s
		if s.preopened {
			pres = append(pres, pre{ss.PreopenIndex, s})
		}
	}
	for _, p := range st.Ports {
		r.ports[p.Key] = p.Port
	}
	sort.Slice(pres, func(a, b int) bool { return pres[a].i < pres[b].i })
	for _, p := range pres {
		r.preopened = append(r.preopened, p.s)
	}
	return r, nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
