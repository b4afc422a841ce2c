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

// DefaultGrace is how long ServeHTTP keeps answering on open keep-alive
// connections (each answer with "Connection: close") before it shuts the
// server down. It should exceed the usual gap between two requests of one
// client; a connection that stays idle for the whole grace period can
// still race with its close, which HTTP/1.1 cannot prevent.
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
}

// ServeHTTP serves srv on every listener, tells the master the worker is
// ready, and when draining begins drains without failing a client:
//
//  1. it closes its own copies of the listeners (the master's copies keep
//     the sockets and their queues; the next generation accepts from them);
//  2. from then on every response carries "Connection: close", so a client
//     that sends on a kept-alive connection gets its answer and reconnects;
//  3. it waits the grace period, or until every connection has closed;
//  4. only then it calls srv.Shutdown with the drain deadline, and returns
//     when that is done.
//
// Hijacked connections (WebSockets) are not waited for: http.Server's
// Shutdown does not track them; register their own shutdown with
// srv.RegisterOnShutdown. HTTP/2 connections get a GOAWAY from Shutdown.
//
// It returns nil after a drain, the first error a listener's Serve
// returns, or the error of srv.Shutdown if the connections outlived the
// drain deadline (the server is then closed). If srv.TLSConfig has
// certificates it serves TLS. ServeHTTP installs a wrapper around
// srv.Handler and srv.ConnState (both keep working) and must not be called
// twice with the same server. It calls HandleSignals (see
// HTTPOptions.OwnSignals), so outside gorolling it serves until SIGTERM or
// SIGINT, then drains the same way.
func ServeHTTP(srv *http.Server, ls ...net.Listener) error {
	return std.serveHTTP(srv, HTTPOptions{}, ls...)
}

// ServeHTTPWith is ServeHTTP with options.
func ServeHTTPWith(srv *http.Server, opt HTTPOptions, ls ...net.Listener) error {
	return std.serveHTTP(srv, opt, ls...)
}

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

	var draining atomic.Bool
	h := srv.Handler
	if h == nil {
		h = http.DefaultServeMux
	}
	srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if draining.Load() {
			w.Header().Set("Connection", "close")
		}
		h.ServeHTTP(w, r)
	})
	var mu sync.Mutex
	open := 0
	allClosed := make(chan struct{}, 1)
	prevState := srv.ConnState
	srv.ConnState = func(c net.Conn, s http.ConnState) {
		mu.Lock()
		switch s {
		case http.StateNew:
			open++
		case http.StateClosed, http.StateHijacked:
			open--
			if open == 0 {
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

	errs := make(chan error, len(ls))
	tls := srv.TLSConfig != nil && (len(srv.TLSConfig.Certificates) > 0 || srv.TLSConfig.GetCertificate != nil)
	for _, l := range ls {
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

	running := len(ls)
	select {
	case err := <-errs:
		running--
		for _, l := range ls {
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
	for _, l := range ls {
		l.Close()
	}
	for ; running > 0; running-- {
		<-errs
	}
	deadline := p.drainDeadline()
	if limit := time.Until(deadline) / 2; grace > limit {
		grace = limit
	}
	// 2-3. Answer with Connection: close until clients have left or the
	// grace period ends.
	t := time.NewTimer(grace)
	for waiting := true; waiting; {
		mu.Lock()
		n := open
		mu.Unlock()
		if n <= 0 {
			break
		}
		select {
		case <-t.C:
			waiting = false
		case <-allClosed:
		}
	}
	t.Stop()
	// 4. Shut down with what is left of the drain deadline, keeping a
	// margin so the master need not kill us.
	margin := min(time.Until(deadline)/10, time.Second)
	ctx, cancel := context.WithDeadline(context.Background(), deadline.Add(-margin))
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		srv.Close()
		return fmt.Errorf("gorolling: connections outlived the drain deadline: %w", err)
	}
	return nil
}
