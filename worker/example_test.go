package worker_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"syscall"
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

// Two listens on port 0 get two ports. Under gorolling every worker gets
// the same two, and so does every later generation; standalone (as here)
// they are plain net.Listen sockets.
func ExampleListen() {
	api, err := worker.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer api.Close()
	admin, err := worker.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer admin.Close()
	fmt.Println("two ports:", api.Addr().String() != admin.Addr().String())
	// Output: two ports: true
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
	defer l.Close()
	fmt.Println("own socket:", l.Addr().Network())
	// Output: own socket: tcp
}

// Every listen error is a *net.OpError that unwraps to the errno, under
// gorolling and standalone alike.
func ExampleListen_errno() {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer busy.Close()
	_, err = worker.Listen("tcp", busy.Addr().String())
	var oe *net.OpError
	fmt.Println(errors.As(err, &oe), errors.Is(err, syscall.EADDRINUSE))
	// Output: true true
}

// A server that is not HTTP: catch the stop signal, say ready once it
// serves, stop accepting when draining begins, finish by the deadline.
func ExampleDraining() {
	worker.HandleSignals() // the master sends SIGTERM after its drain message
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

// Identity, for logs and per-slot resources. Run standalone (as here), a
// program is no worker and has slot -1.
func ExampleSlot() {
	fmt.Printf("worker %v, slot %d, id %d, generation %d\n", worker.IsWorker(), worker.Slot(), worker.ID(), worker.Generation())
	// Output: worker false, slot -1, id 0, generation 0
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
