package master

import (
	"sort"

	"github.com/gorolling/gorolling/master/control"
)

// FillStatus fills the parts of st the master knows: the number of workers
// per generation, the serving generation, every live worker and every
// socket of the registry with the generations that hold it.
func (m *Master) FillStatus(st *control.Status) {
	now := m.cfg.clock.now()
	m.mu.Lock()
	st.Workers = m.workers
	st.ConnsHandedOver, st.ConnsReturned = m.connsHandedOver, m.connsReturned
	st.Generation = 0
	if m.serving != nil {
		st.Generation = m.serving.Num
	}
	st.Processes = nil
	held := map[string]map[int]bool{}
	var liveGens []int
	for _, g := range m.gens {
		liveGens = append(liveGens, g.Num)
		for _, s := range g.slots {
			w := s.w
			if w == nil || w.state == workerExitedState {
				continue
			}
			st.Processes = append(st.Processes, control.WorkerStatus{
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
	m.mu.Unlock()
	sort.Slice(st.Processes, func(i, j int) bool {
		a, b := st.Processes[i], st.Processes[j]
		if a.Generation != b.Generation {
			return a.Generation < b.Generation
		}
		return a.Slot < b.Slot
	})
	st.Listeners = nil
	for _, s := range m.reg.Sockets() {
		ls := control.ListenerStatus{Key: s.Key.String(), Network: s.Network, Address: s.Addr, Name: s.Name, Kind: s.Kind(), Generations: []int{}}
		if s.Kind() == "pre-opened" {
			ls.Generations = append(ls.Generations, liveGens...) // every worker gets it
		} else {
			for g := range held[ls.Key] {
				ls.Generations = append(ls.Generations, g)
			}
			sort.Ints(ls.Generations)
		}
		st.Listeners = append(st.Listeners, ls)
	}
}
