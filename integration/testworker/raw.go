package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/gorolling/gorolling/handoff"
	"golang.org/x/sys/unix"
)

// Workers that speak the handoff protocol by hand, bypassing the worker
// package, to do what it never would.
//
//	rawadopter MODE NET ADDR  listen, adopt and serve HTTP, but on every
//	                          connection the master brings: MODE hang
//	                          (never answer), refuse (decline it)
//	hostile NET ADDR          listen and serve nothing; offer the master a
//	                          connection before the drain, then, draining,
//	                          sockets that are not connections of the
//	                          socket, then a pipe

// rawChannel is the handoff channel without the worker package.
type rawChannel struct {
	c   *handoff.Conn
	seq uint64
}

func openRaw() (*rawChannel, error) {
	fd, err := strconv.Atoi(os.Getenv("GOROLLING_FD"))
	if err != nil {
		return nil, fmt.Errorf("no GOROLLING_FD")
	}
	c, err := handoff.FromFD(fd)
	if err != nil {
		return nil, err
	}
	return &rawChannel{c: c}, nil
}

// send sends one request and returns its seq.
func (r *rawChannel) send(m *handoff.Message, fds ...int) (uint64, error) {
	r.seq++
	m.V, m.Seq = handoff.Version, r.seq
	return r.seq, r.c.Send(m, fds...)
}

// call sends a request and waits for its reply; messages in between are
// passed to other (which closes their descriptors).
func (r *rawChannel) call(m *handoff.Message, other func(*handoff.Message, []int), fds ...int) (*handoff.Message, []int, error) {
	seq, err := r.send(m, fds...)
	if err != nil {
		return nil, nil, err
	}
	for {
		msg, got, err := r.c.Receive()
		if err != nil {
			return nil, nil, err
		}
		if msg.Type == handoff.TypeReply && msg.ReplyTo == seq {
			return msg, got, nil
		}
		other(msg, got)
	}
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// rawListen says hello, asks for one stream socket and says ready. It
// returns the listener and its key.
func (r *rawChannel) rawListen(network, addr string, ignore func(*handoff.Message, []int)) (net.Listener, string, error) {
	if _, _, err := r.call(&handoff.Message{Type: handoff.TypeHello, PID: os.Getpid(), Conns: true}, ignore); err != nil {
		return nil, "", err
	}
	rep, fds, err := r.call(&handoff.Message{Type: handoff.TypeListen, Listen: &handoff.ListenRequest{Network: network, Address: addr}}, ignore)
	if err != nil {
		return nil, "", err
	}
	if rep.Error != "" || len(fds) != 1 {
		closeAll(fds)
		return nil, "", fmt.Errorf("listen: %s", rep.Error)
	}
	f := os.NewFile(uintptr(fds[0]), "listener")
	l, err := net.FileListener(f)
	f.Close()
	return l, rep.Key, err
}

func rawAdopter(mode, network, addr string) {
	signal.Ignore(syscall.SIGTERM) // the master's stop signal after "drain"
	ch, err := openRaw()
	if err != nil {
		emit(report{Op: "rawadopter", Err: err.Error()})
		os.Exit(2)
	}
	ignore := func(_ *handoff.Message, fds []int) { closeAll(fds) }
	l, key, err := ch.rawListen(network, addr, ignore)
	if err != nil {
		emit(report{Op: "rawadopter", Err: err.Error()})
		os.Exit(2)
	}
	if rep, _, err := ch.call(&handoff.Message{Type: handoff.TypeAdopt, Key: key}, ignore); err != nil || rep.Error != "" {
		emit(report{Op: "rawadopter", Err: fmt.Sprint(err, rep)})
		os.Exit(2)
	}
	pid := strconv.Itoa(os.Getpid())
	gen := os.Getenv("GOROLLING_GENERATION")
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Pid", pid)
		w.Header().Set("X-Generation", gen)
	})}
	go srv.Serve(l)
	if _, err := ch.send(&handoff.Message{Type: handoff.TypeReady}); err != nil {
		os.Exit(2)
	}
	emit(report{Op: "rawadopter", Arg: mode, Addr: key})
	offered := 0
	for {
		msg, fds, err := ch.c.Receive()
		if err != nil {
			os.Exit(0)
		}
		closeAll(fds) // never served: the sender keeps the connection
		switch msg.Type {
		case handoff.TypeConn:
			offered++
			emit(report{Op: "offered", OK: offered})
			if mode == "refuse" {
				ch.send(&handoff.Message{Type: handoff.TypeAccept, Conn: msg.Conn, Refuse: true})
			}
		case handoff.TypeDrain:
			l.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			srv.Shutdown(ctx)
			cancel()
			os.Exit(0)
		}
	}
}

func hostile(network, addr string) {
	signal.Ignore(syscall.SIGTERM)
	ch, err := openRaw()
	if err != nil {
		emit(report{Op: "hostile", Err: err.Error()})
		os.Exit(2)
	}
	drained := make(chan struct{}, 1)
	other := func(m *handoff.Message, fds []int) {
		closeAll(fds)
		if m.Type == handoff.TypeDrain {
			select {
			case drained <- struct{}{}:
			default:
			}
		}
	}
	l, key, err := ch.rawListen(network, addr, other)
	if err != nil {
		emit(report{Op: "hostile", Err: err.Error()})
		os.Exit(2)
	}
	ch.send(&handoff.Message{Type: handoff.TypeReady})
	// A connection of the socket, offered before the drain.
	conn := func() int {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			return -1
		}
		go func() { time.Sleep(time.Minute); c.Close() }()
		s, err := l.Accept()
		if err != nil {
			return -1
		}
		f, _ := s.(*net.TCPConn).File()
		return int(f.Fd())
	}
	offer := func(what string, fds ...int) {
		rep, got, err := ch.call(&handoff.Message{Type: handoff.TypeHandoff, Key: key}, other, fds...)
		r := report{Op: "offer", Arg: what}
		if err != nil {
			r.Err = err.Error()
			r.Errno = errnoName(err)
		} else {
			closeAll(got)
			r.Err, r.Addr = rep.Error, rep.Errno
		}
		emit(r)
	}
	offer("predrain", conn())
	// Wait for the drain, reading what comes.
	go func() {
		for {
			m, fds, err := ch.c.Receive()
			if err != nil {
				os.Exit(0)
			}
			other(m, fds)
			if m.Type == handoff.TypeDrain {
				return
			}
		}
	}()
	<-drained
	time.Sleep(200 * time.Millisecond) // the reader above has returned
	lf, _ := l.(*net.TCPListener).File()
	offer("listener", int(lf.Fd()))
	other2, _ := net.Listen("tcp", "127.0.0.1:0")
	c2, _ := net.Dial("tcp", other2.Addr().String())
	s2, _ := other2.Accept()
	f2, _ := s2.(*net.TCPConn).File()
	offer("otherport", int(f2.Fd()))
	c2.Close()
	udp, _ := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM, 0)
	offer("datagram", udp)
	// Not a socket at all: a protocol violation (its close could block).
	var p [2]int
	unix.Pipe2(p[:], unix.O_CLOEXEC)
	offer("pipe", p[0])
	emit(report{Op: "hostile", Arg: "done"})
	time.Sleep(time.Minute)
}
