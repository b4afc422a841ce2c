package worker

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultGrace is how long a draining ServeHTTP keeps answering, each
// answer with "Connection: close", on keep-alive connections that it could
// not hand over (see ServeHTTP) before it shuts the server down. It should
// exceed the usual gap between two requests of one client; a connection
// that stays idle for the whole grace period can still race with its
// close, which HTTP/1.1 cannot prevent.
const DefaultGrace = 2 * time.Second

// HTTPOptions tune ServeHTTPWith. The zero value is the default.
type HTTPOptions struct {
	// Grace overrides DefaultGrace. It is capped at half the drain
	// deadline.
	Grace time.Duration
	// NoReady stops ServeHTTPWith from calling Ready: the program calls it
	// itself, for example after other listeners are open too.
	NoReady bool
	// OwnSignals stops ServeHTTPWith from calling HandleSignals: the
	// program handles SIGTERM and SIGINT itself (and should start its own
	// drain on them: the master sends SIGTERM after the drain message).
	OwnSignals bool
	// NoHandoff keeps every connection in this worker when it drains:
	// "Connection: close" on each answer for the grace period, then
	// Shutdown. Connections handed over from older workers are still
	// adopted.
	NoHandoff bool
}

// ServeHTTP serves srv on every listener, tells the master the worker is
// ready, and when draining begins drains without failing a client.
//
// Under a gorolling master, a worker's HTTP/1.1 connections move to the
// next generation instead of being closed:
//
//  1. it closes its own copies of the listeners (the master's copies keep
//     the sockets and their queues; the next generation accepts from them);
//  2. every connection that waits for its next request is handed over at
//     once (see HandOff), and every other one as soon as its response is
//     written: no "Connection: close", no grace period. Requests it has
//     read already, it answers itself;
//  3. it returns when the last connection is gone, so the drain lasts as
//     long as the longest request in flight.
//
// The worker that takes a connection serves it with its own srv: its
// handler, timeouts and ConnState. ServeHTTP adopts connections for every
// listener the master gave (see Adopt), from the start.
//
// A connection that cannot be handed over (no worker of the serving
// generation adopts it, HTTPOptions.NoHandoff, TLS, or outside gorolling)
// is drained the old way: every further response on it carries
// "Connection: close", so a client that sends on it gets its answer and
// reconnects, until the grace period ends or every such connection has
// closed; then srv.Shutdown with the drain deadline.
//
// Hijacked connections (WebSockets) are not waited for: http.Server's
// Shutdown does not track them; register their own shutdown with
// srv.RegisterOnShutdown, or hand them over with HandOff. HTTP/2
// connections get a GOAWAY from Shutdown.
//
// It returns nil after a drain, the first error a listener's Serve
// returns, or the error of srv.Shutdown if the connections outlived the
// drain deadline (the server is then closed). If srv.TLSConfig has
// certificates it serves TLS. ServeHTTP installs a wrapper around
// srv.Handler, srv.ConnState and srv.ConnContext (all keep working) and
// must not be called twice with the same server. It calls HandleSignals
// (see HTTPOptions.OwnSignals), so outside gorolling it serves until
// SIGTERM or SIGINT, then drains the same way.
func ServeHTTP(srv *http.Server, ls ...net.Listener) error {
	return std.serveHTTP(srv, HTTPOptions{}, ls...)
}

// ServeHTTPWith is ServeHTTP with options.
func ServeHTTPWith(srv *http.Server, opt HTTPOptions, ls ...net.Listener) error {
	return std.serveHTTP(srv, opt, ls...)
}

// connCtxKey carries a request's connection in its context.
type connCtxKey struct{}

func (p *proc) serveHTTP(srv *http.Server, opt HTTPOptions, ls ...net.Listener) error {
	if len(ls) == 0 {
		return errNoListeners
	}
	grace := opt.Grace
	if grace <= 0 {
		grace = DefaultGrace
	}
	if !opt.OwnSignals {
		p.handleSignals()
	}
	drainCh := p.draining()
	tls := srv.TLSConfig != nil && (len(srv.TLSConfig.Certificates) > 0 || srv.TLSConfig.GetCertificate != nil)

	// Every listener the master gave gets a companion that yields the
	// connections older workers hand over; both wrap their connections so
	// that they can be handed over in turn.
	var hs []*httpHandoff
	fellBackC := make(chan struct{}, 1) // a hand-off failed (shared by all hs)
	serveLs := make([]net.Listener, 0, 2*len(ls))
	cl, relays := p.relays()
	for _, l := range ls {
		if relays && !tls {
			if key, ok := cl.keyFor(l.Addr()); ok {
				if a, err := p.adopt(l); err == nil {
					h := &httpHandoff{p: p, key: key, fellBackC: fellBackC}
					h.enabled = !opt.NoHandoff
					hs = append(hs, h)
					serveLs = append(serveLs, handoffListener{l, h}, handoffListener{a, h})
					continue
				}
			}
		}
		serveLs = append(serveLs, l)
	}

	var draining atomic.Bool
	h := srv.Handler
	if h == nil {
		h = http.DefaultServeMux
	}
	srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if draining.Load() {
			hc, ok := r.Context().Value(connCtxKey{}).(*httpConn)
			if !ok || !hc.h.enabled || hc.fellBack() {
				w.Header().Set("Connection", "close")
			}
		}
		h.ServeHTTP(w, r)
	})
	prevCtx := srv.ConnContext
	srv.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		if prevCtx != nil {
			ctx = prevCtx(ctx, c)
		}
		return context.WithValue(ctx, connCtxKey{}, c)
	}
	var mu sync.Mutex
	conns := make(map[net.Conn]struct{})
	allClosed := make(chan struct{}, 1)
	prevState := srv.ConnState
	srv.ConnState = func(c net.Conn, s http.ConnState) {
		mu.Lock()
		switch s {
		case http.StateNew:
			conns[c] = struct{}{}
		case http.StateIdle:
			if hc, ok := c.(*httpConn); ok {
				hc.setIdle() // before net/http's read of the next request
			}
		case http.StateClosed, http.StateHijacked:
			delete(conns, c)
			if len(conns) == 0 {
				select {
				case allClosed <- struct{}{}:
				default:
				}
			}
		}
		mu.Unlock()
		if prevState != nil {
			prevState(c, s)
		}
	}

	errs := make(chan error, len(serveLs))
	for _, l := range serveLs {
		go func() {
			var err error
			if tls {
				err = srv.ServeTLS(l, "", "")
			} else {
				err = srv.Serve(l)
			}
			errs <- err
		}()
	}
	if !opt.NoReady {
		// A failure here means the master is gone; the drain that follows
		// handles it.
		_ = p.ready()
	}

	running := len(serveLs)
	select {
	case err := <-errs:
		running--
		for _, l := range serveLs {
			l.Close()
		}
		for ; running > 0; running-- {
			<-errs
		}
		srv.Close()
		return err
	case <-drainCh:
	}

	// 1. Stop accepting: close our copies only. Then wait for every Serve
	// loop to return: a connection accepted just before the close is
	// tracked by the server only once its loop has moved on, and Shutdown
	// must not miss it (the kernel would reset it when we exit).
	draining.Store(true)
	handingOver := false
	for _, h := range hs {
		if h.enabled {
			h.draining.Store(true)
			handingOver = true
		}
	}
	for _, l := range serveLs {
		l.Close()
	}
	for ; running > 0; running-- {
		<-errs
	}
	// 2. Hand over every connection that waits for a request now; the
	// others go when they next wait.
	if handingOver {
		mu.Lock()
		for c := range conns {
			if hc, ok := c.(*httpConn); ok {
				hc.startDrain()
			}
		}
		mu.Unlock()
	}
	deadline := p.drainDeadline()
	if limit := time.Until(deadline) / 2; grace > limit {
		grace = limit
	}
	margin := min(time.Until(deadline)/10, time.Second)
	// 3. Wait until every connection has gone: handed over, or closed by
	// its client. Connections kept the old way get the grace period: from
	// the drain's start without hand-off, from the first failed hand-off
	// with it.
	var graceC <-chan time.Time
	if !handingOver {
		t := time.NewTimer(grace)
		defer t.Stop()
		graceC = t.C
	}
	end := time.NewTimer(time.Until(deadline.Add(-margin)))
	defer end.Stop()
	var fellBack <-chan struct{}
	if handingOver {
		fellBack = fellBackC
	}
	for waiting := true; waiting; {
		mu.Lock()
		n := len(conns)
		mu.Unlock()
		if n == 0 {
			break
		}
		select {
		case <-graceC:
			waiting = false
		case <-fellBack:
			fellBack = nil
			t := time.NewTimer(grace)
			defer t.Stop()
			graceC = t.C
		case <-end.C:
			waiting = false
		case <-allClosed:
		}
	}
	// 4. Shut down with what is left of the drain deadline, keeping a
	// margin so the master need not kill us.
	ctx, cancel := context.WithDeadline(context.Background(), deadline.Add(-margin))
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		srv.Close()
		return fmt.Errorf("gorolling: connections outlived the drain deadline: %w", err)
	}
	return nil
}
