// Command chat is a line-protocol server whose TCP clients stay connected
// through upgrades: when its generation drains, it hands every client
// connection to the next generation with worker.HandOff, the client's
// state (its nick and how many lines it sent) in the blob, and the new
// generation carries on where the old one stopped. The client notices
// nothing but the generation number in the answers.
//
// The protocol: the server greets a new client with one line, then
// answers every line the client sends with one line:
//
//	hello gen=1 pid=4242
//	/nick ada
//	gen=1 pid=4242 nick=ada n=1: you are ada
//	hi
//	gen=1 pid=4242 nick=ada n=2: hi
//
// A line that cannot be handed over (the next generation does not adopt,
// or none is running) is finished the old way: the client gets "bye" and
// the connection closes.
//
// Try it under gorolling:
//
//	go build -o bin/ ./cmd/gorolling ./integration/examples/chat
//	bin/gorolling exec -w 2 -- bin/chat -listen 127.0.0.1:7000 &
//	nc 127.0.0.1 7000        # type lines; kill -HUP the master between them
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/gorolling/gorolling/worker"
)

// state is what a client's connection carries to the next generation.
type state struct {
	Nick  string `json:"nick"`
	Lines int    `json:"lines"`
}

// maxLine bounds one line; a longer one ends the connection.
const maxLine = 4096

type server struct {
	gen, pid int

	mu       sync.Mutex
	draining bool
	clients  map[net.Conn]struct{}
	wg       sync.WaitGroup
}

func main() {
	addr := flag.String("listen", "127.0.0.1:7000", "address to serve the line protocol on")
	flag.Parse()

	l, err := worker.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("chat: %v", err)
	}
	// Connections older generations hand over arrive here.
	adopted, err := worker.Adopt(l)
	if err != nil {
		log.Fatalf("chat: %v", err)
	}
	worker.HandleSignals()
	s := &server{gen: worker.Generation(), pid: os.Getpid(), clients: map[net.Conn]struct{}{}}
	go s.acceptLoop(l, false)
	go s.acceptLoop(adopted, true)
	if err := worker.Ready(); err != nil {
		log.Printf("chat: ready: %v", err)
	}

	<-worker.Draining()
	l.Close()
	adopted.Close()
	s.drain()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Until(worker.DrainDeadline()) - 500*time.Millisecond):
		log.Printf("chat: clients still connected at the drain deadline")
	}
}

func (s *server) acceptLoop(l net.Listener, adopted bool) {
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			log.Printf("chat: accept: %v", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		var st state
		if ac, ok := c.(*worker.Conn); ok && adopted {
			if err := json.Unmarshal(ac.State(), &st); err != nil {
				log.Printf("chat: bad state from the previous generation: %v", err)
			}
		}
		// One that arrives while draining still gets a handler, which
		// hands it over at once.
		s.mu.Lock()
		s.clients[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.serve(c, st, !adopted)
	}
}

// drain interrupts every client's read; each handler then hands its
// connection over.
func (s *server) drain() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.draining = true
	for c := range s.clients {
		c.SetReadDeadline(time.Unix(1, 0))
	}
}

func (s *server) isDraining() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.draining
}

func (s *server) serve(c net.Conn, st state, greet bool) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.clients, c)
		s.mu.Unlock()
	}()
	if s.isDraining() {
		c.SetReadDeadline(time.Unix(1, 0))
	}
	if greet {
		fmt.Fprintf(c, "hello gen=%d pid=%d\n", s.gen, s.pid)
	}
	br := bufio.NewReaderSize(c, maxLine)
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			if s.isDraining() && errors.Is(err, os.ErrDeadlineExceeded) {
				s.handOff(c, br, line, st)
				return
			}
			c.Close() // the client left, or sent a line too long
			return
		}
		text := strings.TrimRight(string(line), "\r\n")
		st.Lines++
		answer := text
		if nick, ok := strings.CutPrefix(text, "/nick "); ok {
			st.Nick = strings.TrimSpace(nick)
			answer = "you are " + st.Nick
		}
		if _, err := fmt.Fprintf(c, "gen=%d pid=%d nick=%s n=%d: %s\n", s.gen, s.pid, st.Nick, st.Lines, answer); err != nil {
			c.Close()
			return
		}
	}
}

// handOff gives c to the next generation: the part of a line read so far
// and whatever else the reader had buffered go along as unread bytes, so
// the next generation answers them. If no worker takes it, the client
// gets "bye" and the connection closes.
func (s *server) handOff(c net.Conn, br *bufio.Reader, partial []byte, st state) {
	unread := append([]byte(nil), partial...)
	if n := br.Buffered(); n > 0 {
		rest, _ := br.Peek(n)
		unread = append(unread, rest...)
	}
	blob, _ := json.Marshal(st)
	switch err := worker.HandOff(c, blob, unread); {
	case errors.Is(err, worker.ErrNotHandedOver):
		log.Printf("chat: %v", err)
		fmt.Fprintf(c, "bye gen=%d: the server is restarting\n", s.gen)
		c.Close()
	case err != nil:
		// Closed by HandOff: the master died holding the offer.
		log.Printf("chat: %v", err)
	}
}
