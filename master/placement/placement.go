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
	"slices"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"
)

// MaxMembers bounds the members of one group (the master's MaxWorkers).
const MaxMembers = 1024

// Placer steers the reuseport groups of one master. Its methods are safe
// for concurrent use.
type Placer struct {
	mu       sync.Mutex
	groups   map[string]*group
	disabled error // BPF is not available: the kernel's hash decides
}

// group is one reuseport group's program and maps.
type group struct {
	prog  *ebpf.Program
	socks *ebpf.Map // index -> member socket (REUSEPORT_SOCKARRAY)
	state *ebpf.Map // one value: the round-robin counter, the member count
	cur   []uint64  // the socket cookie at each index of socks (0: none)
}

// New returns a placer with no groups.
func New() *Placer { return &Placer{groups: make(map[string]*group)} }

// Update makes the members fds (descriptors of sockets of one group,
// named by the caller's key name, all listening) the ones that get new
// connections, in turn. With no fds the group falls back to the kernel's
// hash over all its sockets. The descriptors must stay open during the
// call; the kernel keeps its own reference to each socket until the next
// Update or the socket closes. The first Update of a group attaches the
// program. It returns ErrUnavailable, wrapped, once if BPF cannot be used,
// and nil for every later call.
func (p *Placer) Update(name string, fds []int) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.disabled != nil {
		return nil
	}
	if len(fds) > MaxMembers {
		fds = fds[:MaxMembers]
	}
	g := p.groups[name]
	if g == nil {
		if len(fds) == 0 {
			return nil
		}
		var err error
		g, err = newGroup(fds[0])
		if err != nil {
			p.disabled = err
			return fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
		p.groups[name] = g
	}
	return g.set(fds)
}

// Sync updates every group of groups (see Update) and drops the program
// and maps of groups not in it, whose sockets are gone. It returns the
// first error.
func (p *Placer) Sync(groups map[string][]int) error {
	var first error
	for name, fds := range groups {
		if err := p.Update(name, fds); err != nil && first == nil {
			first = err
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for name, g := range p.groups {
		if _, ok := groups[name]; !ok {
			g.close()
			delete(p.groups, name)
		}
	}
	return first
}

// Close drops every group's program and maps.
func (p *Placer) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for name, g := range p.groups {
		g.close()
		delete(p.groups, name)
	}
}

// ErrUnavailable is wrapped by Update's error when the kernel refuses the
// program: connections are then spread by the kernel's hash.
var ErrUnavailable = errors.New("placement: even spreading unavailable")

func newGroup(member int) (*group, error) {
	state, err := ebpf.NewMap(&ebpf.MapSpec{Name: "gr_rr", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		return nil, fmt.Errorf("create the counter map: %w", err)
	}
	socks, err := ebpf.NewMap(&ebpf.MapSpec{Name: "gr_members", Type: ebpf.ReusePortSockArray, KeySize: 4, ValueSize: 8, MaxEntries: MaxMembers})
	if err != nil {
		state.Close()
		return nil, fmt.Errorf("create the member map: %w", err)
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "gr_place",
		Type:         ebpf.SkReuseport,
		AttachType:   ebpf.AttachSkReuseportSelectOrMigrate,
		License:      "MIT",
		Instructions: roundRobin(state.FD(), socks.FD()),
	})
	if err != nil {
		state.Close()
		socks.Close()
		return nil, fmt.Errorf("load the program: %w", err)
	}
	if err := unix.SetsockoptInt(member, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, prog.FD()); err != nil {
		prog.Close()
		state.Close()
		socks.Close()
		return nil, fmt.Errorf("attach the program: %w", err)
	}
	return &group{prog: prog, socks: socks, state: state}, nil
}

// roundRobin is the program: add one to the counter, and select member
// counter mod n. If the counter is missing or n is 0, or the selection
// fails (a member that closed a moment ago), it selects nothing, and the
// kernel picks by hash among the sockets still listening.
//
//	r6 = ctx
//	key = 0; v = lookup(state, &key); if v == NULL goto pass
//	atomic v->counter += 1
//	i = v->counter; n = v->n; if n == 0 goto pass
//	i %= n
//	bpf_sk_select_reuseport(ctx, socks, &i, 0)
//	pass: return SK_PASS
func roundRobin(state, socks int) asm.Instructions {
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
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.LoadMapPtr(asm.R2, socks),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, -8),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnSkSelectReuseport.Call(),
		asm.Mov.Imm(asm.R0, 1).WithSymbol("pass"), // SK_PASS
		asm.Return(),
	}
}

// set makes fds the members at indexes 0..len(fds)-1, then sets the count
// (the program reads only indexes below it). A socket can sit at one index
// of a member map only (the kernel answers EBUSY otherwise), so sockets
// are told apart by their cookie: one already at its index stays, one
// that moves leaves its old index first.
func (g *group) set(fds []int) error {
	var errs []error
	next := make([]uint64, 0, len(fds))
	for _, fd := range fds {
		c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
		if err != nil {
			errs = append(errs, fmt.Errorf("socket cookie: %w", err))
			continue
		}
		i := len(next)
		if i < len(g.cur) && g.cur[i] == c {
			next = append(next, c)
			continue
		}
		if j := slices.Index(g.cur, c); j >= 0 {
			_ = g.socks.Delete(uint32(j))
			g.cur[j] = 0
		}
		if err := g.socks.Update(uint32(i), uint64(fd), ebpf.UpdateAny); err != nil {
			errs = append(errs, fmt.Errorf("member %d: %w", i, err))
			continue
		}
		if i < len(g.cur) {
			g.cur[i] = c
		}
		next = append(next, c)
	}
	n := len(next)
	// The counter stays where it is: the 8-byte value is rewritten with
	// the counter read a moment before, a race that can only repeat or
	// skip one member once. (Little-endian: the counter is the low word.)
	var v uint64
	_ = g.state.Lookup(uint32(0), &v)
	v = v&0xffffffff | uint64(n)<<32
	if err := g.state.Update(uint32(0), v, ebpf.UpdateAny); err != nil {
		errs = append(errs, fmt.Errorf("member count: %w", err))
	}
	for i := n; i < len(g.cur); i++ {
		if g.cur[i] != 0 {
			_ = g.socks.Delete(uint32(i))
		}
	}
	g.cur = next
	return errors.Join(errs...)
}

func (g *group) close() {
	g.prog.Close()
	g.socks.Close()
	g.state.Close()
}
