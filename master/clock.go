package master

import "time"

// clock is the master's time: real in production, driven by hand in the
// state machines' tests.
type clock interface {
	now() time.Time
	afterFunc(d time.Duration, f func()) timer
}

// timer is a scheduled call; Stop cancels it if it has not run.
type timer interface{ Stop() bool }

type realClock struct{}

func (realClock) now() time.Time                            { return time.Now() }
func (realClock) afterFunc(d time.Duration, f func()) timer { return time.AfterFunc(d, f) }

// Respawn backoff per slot: 100 ms after a crash, doubling with each crash
// in a row up to 30 s, back to 100 ms once a worker has lived a minute.
const (
	backoffMin     = 100 * time.Millisecond
	backoffMax     = 30 * time.Second
	healthyRuntime = time.Minute
)

// backoff is a slot's respawn delay. The zero value starts at backoffMin.
type backoff struct{ d time.Duration }

// next returns the delay before the next start, after a worker that ran
// for uptime (0 for one that could not even be started).
func (b *backoff) next(uptime time.Duration) time.Duration {
	if b.d == 0 || uptime >= healthyRuntime {
		b.d = backoffMin
	} else {
		b.d = min(2*b.d, backoffMax)
	}
	return b.d
}
