package main

import (
	"errors"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/master"
	"github.com/gorolling/gorolling/master/control"
	"github.com/gorolling/gorolling/master/events"
	"github.com/gorolling/gorolling/master/metrics"
	"github.com/gorolling/gorolling/master/registry"
	"github.com/gorolling/gorolling/master/sdnotify"
	"github.com/gorolling/gorolling/upgrade"
	"github.com/hashicorp/go-hclog"
	oklog "github.com/oklog/run"
	"golang.org/x/net/netutil"
	"golang.org/x/sys/unix"
)

// daemon is a running master: its parts, wired as one group of actors.
// Each part owns what it created; the daemon owns the registry and the
// control socket, and closes them last.
type daemon struct {
	log     hclog.Logger
	program string
	version string
	started time.Time

	self *upgrade.Self
	reg  *registry.Registry
	ctl  *control.Server // nil with --control none
	m    *master.Master
	mgr  *upgrade.Manager

	stopOnce sync.Once
	stopReq  chan struct{} // closed by the first stop request

	metrics    *metrics.Metrics // nil without --metrics
	metricsL   net.Listener     // where they are served
	store      *sdnotify.Store  // systemd's fd store, nil if not kept
	storeWake  chan struct{}    // the registry or the master changed
	storeErr   string           // the last fd store failure logged, and when
	storeErrAt time.Time
	watchdog   time.Duration // WatchdogSec=, 0 for none
}

// errStopRequested ends the group after TERM, INT or "gorolling stop".
var errStopRequested = errors.New("stop requested")

// run serves until the master stops: signals, the control socket, the
// upgrade queue and the master, each an actor of one oklog/run group, so
// that whichever ends first (a stop request, a failed first generation, a
// successor taking over) stops the others in order. It returns the first
// generation's error if it could not start.
//
//	HUP        upgrade: the master if its binary changed on disk, else the workers
//	USR2       re-exec the master
//	TERM, INT  graceful stop; a second one kills the workers
//	TTIN, TTOU one worker more, one fewer
func (d *daemon) run() error {
	// Signals are caught before anything starts: a signal during start-up
	// is handled, not fatal.
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM, syscall.SIGUSR2, syscall.SIGTTIN, syscall.SIGTTOU)
	defer signal.Stop(sigs)

	var g oklog.Group
	// Signals: served until the master has stopped, so that a second TERM
	// during the drain still kills the workers.
	g.Add(func() error {
		d.signals(sigs)
		return nil
	}, func(error) {})
	// A stop request ends the group.
	quit := make(chan struct{})
	g.Add(func() error {
		select {
		case <-d.stopReq:
			return errStopRequested
		case <-quit:
			return nil
		}
	}, func(error) { close(quit) })
	// The first generation, then the upgrade queue.
	g.Add(d.mgr.Run, func(error) { d.mgr.Stop() })
	// The master's workers: their drain is the group's stop.
	g.Add(func() error {
		<-d.m.Done()
		return nil
	}, func(err error) {
		if errors.Is(err, upgrade.ErrHandedOver) {
			d.log.Info("handing over to the new master; draining this master's workers", events.Key, events.MasterHandingOver)
		}
		go d.m.Stop()
	})
	// systemd: the fd store and the watchdog.
	mgrQuit := make(chan struct{})
	g.Add(func() error {
		d.serveManager(mgrQuit)
		return nil
	}, func(error) { close(mgrQuit) })
	if d.metricsL != nil {
		// Anyone who can reach the address can connect: a root master must
		// not hold a descriptor and a goroutine for each of them for ever.
		srv := &http.Server{
			Handler:           d.metrics.Handler(),
			ReadHeaderTimeout: 5 * time.Second,
			ReadTimeout:       10 * time.Second,
			WriteTimeout:      10 * time.Second,
			IdleTimeout:       30 * time.Second,
			MaxHeaderBytes:    8 << 10,
		}
		l := netutil.LimitListener(d.metricsL, metricsConns)
		done := make(chan struct{})
		go func() {
			// A successor answers only once it serves: before, its
			// predecessor does, and a successor that fails must never have
			// answered (its counters would interleave with the old ones).
			for d.self.HasParent() && !d.mgr.TookOver() {
				select {
				case <-done:
					return
				case <-time.After(20 * time.Millisecond):
				}
			}
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				d.log.Warn("metrics: no longer served", "error", err)
			}
		}()
		g.Add(func() error {
			<-done
			return nil
		}, func(error) {
			close(done)
			srv.Close()
			l.Close()
		})
	}
	if debugStall != nil {
		go debugStall(d)
	}
	handedOver := false
	if d.ctl != nil {
		g.Add(func() error { return d.ctl.Serve(d) }, func(err error) {
			d.ctl.Close(!d.sharesFiles(err))
		})
	}
	err := g.Run()
	if errors.Is(err, upgrade.ErrHandedOver) {
		handedOver = true
	}
	if errors.Is(err, errStopRequested) && d.store != nil && d.speaksForService() {
		// A requested stop is final: the next start, "systemctl restart"
		// included (systemd keeps the store across it), begins afresh.
		// A master that failed keeps the store, so that its restart finds
		// the sockets and their queues.
		if cerr := d.store.Clear(); cerr != nil {
			d.log.Warn("fd store: could not empty it at the stop", events.Key, events.StoreFailed, "error", cerr)
		}
	}
	d.close(!d.sharesFiles(err))
	if errors.Is(err, errStopRequested) || handedOver {
		return nil
	}
	return err
}

// metricsConns bounds the connections the metrics endpoint serves at once;
// more wait in the listen queue.
const metricsConns = 16

// sharesFiles reports whether the socket files must stay when this master
// ends: a successor serves them (err is ErrHandedOver), or this master is
// a successor that never took over (its start failed, or it was stopped
// before it served), and the master it was to replace still serves them.
func (d *daemon) sharesFiles(err error) bool {
	return errors.Is(err, upgrade.ErrHandedOver) || (d.self.HasParent() && !d.mgr.TookOver())
}

// close releases the sockets once the workers are gone, after the control
// answers still in flight (at most 5 s).
func (d *daemon) close(removeFiles bool) {
	if d.m != nil {
		d.m.Stop() // no-op if stopped
	}
	if d.ctl != nil {
		d.ctl.Close(removeFiles)
		d.ctl.Wait(5 * time.Second)
	}
	d.reg.Close(removeFiles)
}

// signals handles the master's signals until it has stopped.
func (d *daemon) signals(sigs <-chan os.Signal) {
	stops := 0
	for {
		select {
		case <-d.m.Done():
			return
		case s := <-sigs:
			sig := s.(syscall.Signal)
			name := unix.SignalName(sig)
			switch sig {
			case syscall.SIGHUP, syscall.SIGUSR2:
				kind := upgrade.Auto
				if sig == syscall.SIGUSR2 {
					kind = upgrade.Master
				}
				if d.m.Stopping() {
					d.log.Warn("upgrade ignored: the master is stopping", "signal", name)
					continue
				}
				d.log.Info("upgrade requested", "signal", name, "kind", kind.String())
				d.mgr.Trigger(kind)
			case syscall.SIGINT, syscall.SIGTERM:
				if stops++; stops > 1 {
					d.log.Warn("second stop signal: killing workers now", "signal", name)
					d.m.Kill()
					continue
				}
				d.requestStop(name)
			case syscall.SIGTTIN, syscall.SIGTTOU:
				n := d.m.Size() + 1
				if sig == syscall.SIGTTOU {
					n = d.m.Size() - 1
				}
				if err := d.mgr.Resize(func() error { return d.m.Scale(n) }); err != nil {
					d.log.Warn("scale refused", "signal", name, "error", err)
				}
			}
		}
	}
}

// Stop asks for a graceful stop (control.Handler).
func (d *daemon) Stop() error {
	if d.self.HasParent() && !d.mgr.TookOver() {
		return errors.New("this master is still taking over from the previous one; ask again in a moment")
	}
	d.requestStop("control")
	return nil
}

// requestStop begins a graceful stop once; via says who asked.
func (d *daemon) requestStop(via string) {
	d.stopOnce.Do(func() {
		d.log.Info("stop requested", "via", via)
		d.self.Notify("STOPPING=1")
		close(d.stopReq)
	})
}

// Status returns the master's status (control.Handler).
func (d *daemon) Status() control.Status {
	now := time.Now()
	st := control.Status{
		PID:                  os.Getpid(),
		Version:              d.version,
		Program:              d.program,
		Started:              d.started,
		UptimeSec:            now.Sub(d.started).Seconds(),
		ServiceStarted:       d.self.ServiceStarted(),
		MasterUpgrades:       d.self.MasterUpgrades(),
		MasterRestarts:       d.self.MasterRestarts(),
		FDStore:              d.storeStatus(),
		Upgrade:              d.mgr.Note(),
		MasterUpgradeFailure: d.mgr.MasterFailure(),
	}
	if st.ServiceStarted.IsZero() {
		st.ServiceStarted = d.started
	}
	if d.ctl != nil {
		st.ControlPath = d.ctl.Path()
	}
	d.m.FillStatus(&st)
	return st
}

// Upgrade queues an upgrade (control.Handler).
func (d *daemon) Upgrade(kind string) (<-chan control.UpgradeOutcome, error) {
	k, err := upgrade.ParseKind(kind)
	if err != nil {
		return nil, err
	}
	if d.m.Stopping() {
		return nil, errors.New("the master is stopping")
	}
	if d.self.HasParent() && !d.mgr.TookOver() {
		// This is a new master still starting beside the one it replaces,
		// which shares the control socket: the request is that one's.
		return nil, errors.New("this master is still taking over from the previous one; ask again in a moment")
	}
	d.log.Info("upgrade requested", "via", "control", "kind", k.String())
	res := d.mgr.Trigger(k)
	out := make(chan control.UpgradeOutcome, 1)
	go func() { out <- (<-res).Outcome() }()
	return out, nil
}

// Scale sets the number of workers (control.Handler).
func (d *daemon) Scale(n, delta int) (int, error) {
	if delta != 0 {
		n = d.m.Size() + delta
	}
	if err := d.mgr.Resize(func() error { return d.m.Scale(n) }); err != nil {
		return 0, err
	}
	return n, nil
}

var _ control.Handler = (*daemon)(nil)
