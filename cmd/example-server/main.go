// Command example-server is a small HTTP server built on the gorolling
// worker package, for the README tour, the integration tests and the
// benchmark. Every response names the process that served it in the
// headers X-Pid, X-Slot and X-Generation, and X-Peer names the client's
// address as the server saw it (one value per TCP connection).
//
// Under a gorolling master its keep-alive connections move to the next
// generation when it drains (-no-handoff: the old drain, which closes
// them). -request-log appends one line per request: the X-Request-Id
// header, the pid and the generation that answered.
//
// Under "gorolling exec" it shares its listener with the other workers and
// drains without client errors; run directly it is a plain HTTP server
// (with -reuseport, several copies can share a port through SO_REUSEPORT).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/worker"
	"golang.org/x/sys/unix"
)

func main() {
	addr := flag.String("listen", ":8080", "address to serve HTTP on")
	readyDelay := flag.Duration("ready-delay", 0, "sleep this long after listening before telling the master it is ready (a slow start)")
	crash := flag.Bool("crash-at-start", false, "exit with status 1 at once (a broken release)")
	neverReady := flag.Bool("never-ready", false, "serve, but never tell the master it is ready (a hung start)")
	grace := flag.Duration("grace", 0, "keep-alive grace period while draining (default: worker.DefaultGrace)")
	reuseport := flag.Bool("reuseport", false, "standalone only: bind with SO_REUSEPORT so several copies share the port")
	printReady := flag.Bool("print-ready", false, "print \"ready PID\" on stdout once ready (for benchmarks)")
	noHandoff := flag.Bool("no-handoff", false, "when draining, close keep-alive connections (Connection: close, then a grace period) instead of handing them to the next generation")
	requestLog := flag.String("request-log", "", "append \"REQUEST-ID PID GENERATION\" to this file for every request with an X-Request-Id header")
	flag.Parse()

	if *crash {
		fmt.Fprintln(os.Stderr, "example-server: crashing at start, as asked")
		os.Exit(1)
	}

	lc := worker.ListenConfig{}
	if *reuseport && !worker.IsWorker() {
		lc.Net.Control = func(network, address string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			})
			if err != nil {
				return err
			}
			return serr
		}
	}
	l, err := lc.Listen(context.Background(), "tcp", *addr)
	if err != nil {
		log.Fatalf("example-server: %v", err)
	}

	var reqLog *os.File
	if *requestLog != "" {
		// O_APPEND: every worker of every generation appends whole lines.
		reqLog, err = os.OpenFile(*requestLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			log.Fatalf("example-server: %v", err)
		}
	}
	pid := strconv.Itoa(os.Getpid())
	slot := strconv.Itoa(worker.Slot())
	gen := strconv.Itoa(worker.Generation())
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		// Read the whole body (POSTs in the tests carry one).
		n, _ := io.Copy(io.Discard, r.Body)
		if d, err := time.ParseDuration(r.URL.Query().Get("sleep")); err == nil && d > 0 && d <= time.Minute {
			time.Sleep(d)
		}
		h := w.Header()
		h.Set("X-Pid", pid)
		h.Set("X-Slot", slot)
		h.Set("X-Generation", gen)
		h.Set("X-Peer", r.RemoteAddr)
		if id := r.Header.Get("X-Request-Id"); id != "" && reqLog != nil {
			fmt.Fprintf(reqLog, "%s %s %s\n", strconv.Quote(id), pid, gen)
		}
		h.Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintf(w, "hello from pid %s, slot %s, generation %s (read %d bytes)\n", pid, slot, gen, n)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	if *readyDelay == 0 && *grace == 0 && !*neverReady && !*printReady && !*noHandoff {
		// The usual case: ServeHTTP says ready once it serves.
		if err := worker.ServeHTTP(srv, l); err != nil {
			log.Fatalf("example-server: serve: %v", err)
		}
		return
	}
	if *readyDelay > 0 {
		time.Sleep(*readyDelay)
	}
	opts := worker.HTTPOptions{Grace: *grace, NoReady: true, NoHandoff: *noHandoff}
	if !*neverReady {
		if err := worker.Ready(); err != nil {
			log.Printf("example-server: ready: %v", err)
		}
		if *printReady {
			fmt.Printf("ready %s\n", pid)
		}
	}
	if err := worker.ServeHTTPWith(srv, opts, l); err != nil {
		log.Fatalf("example-server: serve: %v", err)
	}
}
