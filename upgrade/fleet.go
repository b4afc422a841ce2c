package upgrade

import (
	"context"
	"time"

	"github.com/gorolling/gorolling/master"
)

// fleet is what the Manager needs of the master; realFleet is the master,
// and the state machine's tests fake it.
type fleet interface {
	resolve() (string, error)
	startGeneration(path string, serving bool) (generation, error)
	promote(generation) (generation, error)
	serving() generation
	counters() (lastGeneration, lastWorkerID int)
	stopping() bool
}

// generation is what the Manager needs of one generation.
type generation interface {
	number() int
	started() time.Time
	waitReady(ctx context.Context) error
	waitFirst(ctx context.Context) error
	readyTiming() time.Duration
	drain()
}

type realFleet struct{ m *master.Master }

func (f realFleet) resolve() (string, error) { return f.m.Resolve() }

func (f realFleet) startGeneration(path string, serving bool) (generation, error) {
	g, err := f.m.StartGeneration(path, serving)
	if g == nil {
		return nil, err
	}
	return realGen{g}, err
}

func (f realFleet) promote(g generation) (generation, error) {
	old, err := f.m.Promote(g.(realGen).g)
	if old == nil {
		return nil, err
	}
	return realGen{old}, err
}

func (f realFleet) serving() generation {
	if g := f.m.Serving(); g != nil {
		return realGen{g}
	}
	return nil
}

func (f realFleet) counters() (int, int) { return f.m.Counters() }
func (f realFleet) stopping() bool       { return f.m.Stopping() }

type realGen struct{ g *master.Generation }

func (g realGen) number() int                         { return g.g.Num }
func (g realGen) started() time.Time                  { return g.g.Started }
func (g realGen) waitReady(ctx context.Context) error { return g.g.WaitReady(ctx) }
func (g realGen) waitFirst(ctx context.Context) error { return g.g.WaitFirst(ctx) }
func (g realGen) readyTiming() time.Duration          { return g.g.ReadyTiming() }
func (g realGen) drain()                              { g.g.Drain() }
