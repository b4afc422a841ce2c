package worker_test

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/http"
	"time"

	"github.com/gorolling/gorolling/worker"
)

// A complete HTTP server: under gorolling every worker shares :8080 and
// drains without client errors on upgrade; run directly it is a plain
// server that drains on SIGTERM.
func ExampleServeHTTP() {
	l, err := worker.Listen("tcp", ":8080")
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from slot %d, generation %d\n", worker.Slot(), worker.Generation())
	})}
	// ServeHTTP calls worker.Ready once it serves, and returns after the drain.
	if err := worker.ServeHTTP(srv, l); err != nil {
		log.Fatal(err)
	}
}

// Two listens on port 0: every worker gets the same two ports, and so does
// every later generation.
func ExampleListen() {
	api, err := worker.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	admin, err := worker.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("api on %s, admin on %s", api.Addr(), admin.Addr())
}

// A shared UDP socket: each datagram goes to one of the workers.
func ExampleListenPacket() {
	pc, err := worker.ListenPacket("udp", ":5353")
	if err != nil {
		log.Fatal(err)
	}
	worker.Ready()
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		pc.WriteTo(buf[:n], from)
	}
}

// A socket the master inherited as its fd 3 (from systemd, or a shell's
// "3<>" redirect), like Node's listen({fd: 3}).
func ExampleListenFD() {
	l, err := worker.ListenFD(3)
	if err != nil {
		log.Fatal(err)
	}
	log.Fatal(worker.ServeHTTP(&http.Server{}, l))
}

// An exclusive listen: this worker binds its own socket; nothing is shared.
func ExampleListenConfig_exclusive() {
	lc := worker.ListenConfig{Exclusive: true}
	l, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("worker %d has its own port %s", worker.ID(), l.Addr())
}

// A server that is not HTTP: say ready once it serves, stop accepting when
// draining begins, finish by the deadline.
func ExampleDraining() {
	l, err := worker.Listen("tcp", ":7000")
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) { defer c.Close(); c.Write([]byte("hi\n")) }(c)
		}
	}()
	if err := worker.Ready(); err != nil {
		log.Print(err)
	}
	<-worker.Draining()
	l.Close() // the master's copy keeps the socket for the next generation
	time.Sleep(time.Until(worker.DrainDeadline()) / 2)
}

// Identity, for logs and per-slot resources.
func ExampleSlot() {
	if worker.IsWorker() {
		log.Printf("slot %d, worker id %d, generation %d", worker.Slot(), worker.ID(), worker.Generation())
	}
}

// Ready after a slow start: the master waits (up to --ready-timeout) before
// it retires the previous generation.
func ExampleReady() {
	l, err := worker.Listen("tcp", ":8080")
	if err != nil {
		log.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- worker.ServeHTTPWith(&http.Server{}, worker.HTTPOptions{NoReady: true}, l) }()
	warmCaches()
	if err := worker.Ready(); err != nil {
		log.Print(err)
	}
	if err := <-done; err != nil {
		log.Fatal(err)
	}
}

func warmCaches() {}
