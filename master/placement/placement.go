// Package placement owns how the master spreads new connections over a
// generation's workers. Each TCP listen key is a SO_REUSEPORT group with
// one socket per slot (the registry's members); placement attaches to the
// group a small BPF program (github.com/cilium/ebpf, type SK_REUSEPORT)
// that gives every new connection to the next member, round-robin, among
// the members whose slot has a ready worker. So workers get equal shares
// of connections whatever the scheduler does, a slot whose worker crashed
// gets no new connection until its replacement is ready, and the queue of
// a member that closes (a scale-down) moves to the others instead of
// being reset (the program's attach type is select-or-migrate, which the
// kernel honours even with net.ipv4.tcp_migrate_req off).
//
// Without BPF (no CAP_BPF, a seccomp filter, an old kernel) the group
// keeps the kernel's own choice, a hash of each connection's addresses,
// and Update reports why once.
//
// The program and its maps belong to this master process. A successor
// master, or one restarted with systemd's fd store, builds its own and
// attaches it to the same groups, replacing the old one.
package placement

import (
	"errors"
	"fmt"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"
)

// MaxMembers bounds the members of one group (the master's MaxWorkers).
const MaxMembers = 1024

// MaxGroups bounds the groups one placer steers. Each costs the master four
// descriptors (the program and three maps); groups past the bound (a
// worker that asks for many addresses) keep the kernel's hash, so a worker
// cannot make the master hold more than 4 x MaxGroups descriptors for
// placement.
const MaxGroups = 64

// Member is one socket of a reuseport group.
type Member struct {
	// Slot is the member's slot, 0..MaxMembers-1.
	Slot int
	// FD is a descriptor of the socket, open during the call it is
	// passed to.
	FD int
	// Active says the slot has a ready worker: the member gets new
	// connections.
	Active bool
}

// Placer steers the reuseport groups of one master. Its methods are safe
// for concurrent use.
type Placer struct {
	mu       sync.Mutex
	groups   map[string]*group
	disabled error // BPF is not available: the kernel's hash decides
}

// group is one reuseport group's program and maps. Members sit at their
// slot's index of socks and never move; order lists the active slots, and
// the program deals connections over order[0..n-1].
type group struct {
	prog  *ebpf.Program
	socks *ebpf.Map      // slot -> member socket (REUSEPORT_SOCKARRAY)
	order *ebpf.Map      // i -> slot, for i < n (ARRAY of u32)
	state *ebpf.Map      // one value: the round-robin counter and n (u32 each)
	at    map[int]uint64 // slot -> the cookie of the socket at that index of socks
}

// New returns a placer with no groups.
func New() *Placer { return &Placer{groups: make(map[string]*group)} }

// ErrUnavailable is wrapped by Sync's error when the kernel refuses the
// program: connections are then spread by the kernel's hash.
var ErrUnavailable = errors.New("placement: even spreading unavailable")

// Sync makes every group of groups (named by the caller) deal new
// connections round-robin over its active members, attaching the program
// at a group's first sync; groups not named any more are forgotten (their
// sockets are gone). It returns ErrUnavailable, wrapped, the first time BPF
// cannot be used, and nothing for that reason afterwards: the kernel's
// hash then spreads every group's connections.
func (p *Placer) Sync(groups map[string][]Member) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.disabled != nil {
		return nil
	}
	// Gone groups first, so that their room goes to waiting ones.
	for name, g := range p.groups {
		if _, ok := groups[name]; !ok {
			g.close()
			delete(p.groups, name)
		}
	}
	var errs []error
	for name, ms := range groups {
		if len(ms) == 0 {
			continue
		}
		g := p.groups[name]
		if g == nil {
			if len(p.groups) >= MaxGroups {
				continue
			}
			var err error
			if g, err = newGroup(ms[0].FD); err != nil {
				p.disabled = err
				return fmt.Errorf("%w: %v", ErrUnavailable, err)
			}
			p.groups[name] = g
		}
		// Attach again at every sync: a worker holding a member could
		// have replaced or detached the program (any socket of the group
		// may), and this puts the master's back.
		_ = unix.SetsockoptInt(ms[0].FD, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, g.prog.FD())
		if err := g.set(ms); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// Close drops every group's program and maps. The programs stay attached
// to their groups until a successor replaces them or the sockets close.
func (p *Placer) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for name, g := range p.groups {
		g.close()
		delete(p.groups, name)
	}
}

func newGroup(member int) (*group, error) {
	g := &group{at: map[int]uint64{}}
	var err error
	if g.state, err = ebpf.NewMap(&ebpf.MapSpec{Name: "gr_rr", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1}); err != nil {
		return nil, fmt.Errorf("create the counter map: %w", err)
	}
	if g.order, err = ebpf.NewMap(&ebpf.MapSpec{Name: "gr_order", Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: MaxMembers}); err != nil {
		g.close()
		return nil, fmt.Errorf("create the order map: %w", err)
	}
	if g.socks, err = ebpf.NewMap(&ebpf.MapSpec{Name: "gr_members", Type: ebpf.ReusePortSockArray, KeySize: 4, ValueSize: 8, MaxEntries: MaxMembers}); err != nil {
		g.close()
		return nil, fmt.Errorf("create the member map: %w", err)
	}
	if g.prog, err = ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "gr_place",
		Type:         ebpf.SkReuseport,
		AttachType:   ebpf.AttachSkReuseportSelectOrMigrate,
		License:      "MIT",
		Instructions: roundRobin(g.state.FD(), g.order.FD(), g.socks.FD()),
	}); err != nil {
		g.close()
		return nil, fmt.Errorf("load the program: %w", err)
	}
	if err := unix.SetsockoptInt(member, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, g.prog.FD()); err != nil {
		g.close()
		return nil, fmt.Errorf("attach the program: %w", err)
	}
	return g, nil
}

// roundRobin is the program: add one to the counter and select the member
// of slot order[counter mod n]. If n is 0 or the selection fails (a member
// that closed a moment ago), it selects nothing, and the kernel picks by
// hash among the sockets still listening.
//
//	r6 = ctx
//	v = lookup(state, 0); if !v goto pass
//	atomic v->counter += 1
//	i = v->counter; n = v->n; if n == 0 goto pass
//	i %= n
//	o = lookup(order, i); if !o goto pass
//	slot = *o
//	bpf_sk_select_reuseport(ctx, socks, &slot, 0)
//	pass: return SK_PASS
func roundRobin(state, order, socks int) asm.Instructions {
	return asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.StoreImm(asm.RFP, -4, 0, asm.Word),
		asm.LoadMapPtr(asm.R1, state),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "pass"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.Word),
		asm.LoadMem(asm.R1, asm.R0, 0, asm.Word),
		asm.LoadMem(asm.R2, asm.R0, 4, asm.Word),
		asm.JEq.Imm(asm.R2, 0, "pass"),
		asm.Mod.Reg32(asm.R1, asm.R2),
		asm.StoreMem(asm.RFP, -8, asm.R1, asm.Word),
		asm.LoadMapPtr(asm.R1, order),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -8),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "pass"),
		asm.LoadMem(asm.R1, asm.R0, 0, asm.Word),
		asm.StoreMem(asm.RFP, -12, asm.R1, asm.Word),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.LoadMapPtr(asm.R2, socks),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, -12),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnSkSelectReuseport.Call(),
		asm.Mov.Imm(asm.R0, 1).WithSymbol("pass"), // SK_PASS
		asm.Return(),
	}
}

// set puts every member at its slot's index (a socket that is there
// already stays: the kernel refuses one socket at two indexes), then the
// active slots into order, then their count. The program reads order only
// below the count, and each entry is one aligned word, so while set runs
// a connection goes to a slot that was active before or is active now.
func (g *group) set(ms []Member) error {
	var errs []error
	var active []uint32
	seen := map[int]bool{}
	for _, m := range ms {
		if m.Slot < 0 || m.Slot >= MaxMembers {
			continue
		}
		seen[m.Slot] = true
		c, err := unix.GetsockoptUint64(m.FD, unix.SOL_SOCKET, unix.SO_COOKIE)
		if err != nil {
			errs = append(errs, fmt.Errorf("slot %d: socket cookie: %w", m.Slot, err))
			continue
		}
		if g.at[m.Slot] != c {
			if err := g.socks.Update(uint32(m.Slot), uint64(m.FD), ebpf.UpdateAny); err != nil {
				errs = append(errs, fmt.Errorf("slot %d: %w", m.Slot, err))
				continue
			}
			g.at[m.Slot] = c
		}
		if m.Active {
			active = append(active, uint32(m.Slot))
		}
	}
	for slot := range g.at {
		if !seen[slot] {
			// Closed: the kernel has dropped it from socks already.
			delete(g.at, slot)
		}
	}
	for i, slot := range active {
		if err := g.order.Update(uint32(i), slot, ebpf.UpdateAny); err != nil {
			errs = append(errs, fmt.Errorf("order %d: %w", i, err))
			return errors.Join(errs...)
		}
	}
	// The counter stays where it is: the 8-byte value is rewritten with
	// the counter read a moment before, a race that can only repeat or
	// skip one member once. (Little-endian: the counter is the low word.)
	var v uint64
	_ = g.state.Lookup(uint32(0), &v)
	v = v&0xffffffff | uint64(len(active))<<32
	if err := g.state.Update(uint32(0), v, ebpf.UpdateAny); err != nil {
		errs = append(errs, fmt.Errorf("member count: %w", err))
	}
	return errors.Join(errs...)
}

func (g *group) close() {
	if g.prog != nil {
		g.prog.Close()
	}
	for _, m := range []*ebpf.Map{g.socks, g.order, g.state} {
		if m != nil {
			m.Close()
		}
	}
}
