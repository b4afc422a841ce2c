package master

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/gorolling/gorolling/handoff"
	"github.com/gorolling/gorolling/master/events"
	"golang.org/x/sys/unix"
)

// Connection relay: a draining worker offers a connected socket (handoff),
// the master passes it to a ready worker of the serving generation that
// adopts the socket's key (conn), and that worker takes it (accept). The
// offer's reply tells the sender how it ended.
//
// Exactly one worker ever reads the connection. The sender stops reading
// before it offers and keeps its own descriptor until the reply: on
// success it closes that copy (a close of one of several descriptors does
// not end a TCP connection), on failure it goes on serving. The adopter
// does not touch the socket before the master answers its accept, and the
// master answers "yes" to at most one accept per offer, and only while the
// offer is still open; once it has given up on an adopter, a late accept
// gets "no" and the adopter closes its copy unread. The master itself
// closes its copy as soon as the offer is decided, so its descriptor count
// is back where it was after every hand-off.
const (
	// relayTimeout bounds an offer from receipt to reply, and
	// acceptTimeout the wait for one adopter's accept: past either, the
	// master tries the next adopter or gives the connection back.
	relayTimeout  = time.Second
	acceptTimeout = 500 * time.Millisecond
	// maxOffers bounds the offers of one worker in flight at once; the
	// master reads no further request from that worker until one ends.
	maxOffers = 64
	// adoptWait is how long after its ready a worker that speaks the relay
	// may take to announce adoption; offers wait for it, polling every
	// adoptPoll.
	adoptWait = 500 * time.Millisecond
	adoptPoll = 10 * time.Millisecond
)

// sockRef is what the master knows of a socket a worker got through a
// listen, for checking what that worker hands over for it.
type sockRef struct {
	unix bool // a unix socket; otherwise an internet one bound to port
	port int
}

func newSockRef(network, addr string) sockRef {
	r := sockRef{unix: strings.HasPrefix(network, "unix")}
	if !r.unix {
		if _, p, err := net.SplitHostPort(addr); err == nil {
			r.port, _ = strconv.Atoi(p)
		}
	}
	return r
}

// relay is one offer in flight between its sender and an adopter.
type relay struct {
	id      uint64
	to      *child
	decided bool
	taken   chan bool // the adopter's answer: true to take it
}

// adopt records that w adopts the connections of key, a socket it holds.
func (w *child) adopt(key string, reply *handoff.Message) {
	w.m.mu.Lock()
	defer w.m.mu.Unlock()
	if _, ok := w.socks[key]; !ok {
		reply.Errno, reply.Error = "EINVAL", fmt.Sprintf("adopt %s: this worker does not hold that socket", key)
		return
	}
	w.adopts[key] = true
}

// closeConn closes the master's copy of a handed-over socket without ever
// blocking: lingering is switched off first (the default of every socket),
// so that even a last copy with unsent data and a long SO_LINGER, which a
// hostile sender can arrange, closes at once and the kernel finishes the
// connection in the background. It does not reset the connection, which
// other copies may still serve.
func closeConn(fd int) {
	_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 0})
	unix.Close(fd)
}

// offer handles one handoff request of w, which arrived at received with
// fd: it checks the descriptor and relays it on a goroutine of its own,
// which sends the reply. It returns false if w broke the protocol (a
// descriptor that is not a socket: its close could block, so the master
// takes none of those).
func (w *child) offer(msg *handoff.Message, fd int, received time.Time) bool {
	m := w.m
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		handoff.Discard([]int{fd})
		return false
	}
	reply := &handoff.Message{V: handoff.Version, Type: handoff.TypeReply, ReplyTo: msg.Seq}
	refuse := func(errno, text string) {
		closeConn(fd)
		reply.Errno, reply.Error = errno, text
		_ = w.conn.Send(reply)
	}
	m.mu.Lock()
	ref, held := w.socks[msg.Key]
	draining := w.state == workerDraining
	m.mu.Unlock()
	if !held {
		refuse("EINVAL", fmt.Sprintf("handoff %s: this worker does not hold that socket", msg.Key))
		return true
	}
	if !draining {
		refuse("EINVAL", "handoff: only a draining worker hands connections over")
		return true
	}
	if err := handoff.CheckConn(fd, ref.unix, ref.port); err != nil {
		refuse(handoff.ErrnoName(err), "handoff: the descriptor is "+err.Error())
		return true
	}
	// The window: at most maxOffers of this worker's offers at once. The
	// serve loop waits here, so the worker's further sends wait too; the
	// wait counts against the offer's bound.
	w.offers <- struct{}{}
	go func() {
		defer func() { <-w.offers }()
		by := m.relayConn(w, msg, fd, received.Add(relayTimeout))
		closeConn(fd)
		if by == nil {
			m.mu.Lock()
			m.connsReturned++
			m.mu.Unlock()
			reply.Errno, reply.Error = "EAGAIN", "handoff: no worker of the serving generation took the connection"
		} else {
			reply.AdoptedBy = by.ID
		}
		if err := w.conn.Send(reply); err != nil {
			w.log.Debug("handoff reply not delivered", "error", err)
		}
	}()
	return true
}

// relayConn passes fd to adopters of the serving generation, the least
// loaded first, until one takes it or the deadline has passed. It returns
// the adopter, or nil. The caller closes fd. Real time, whatever the
// master's clock: the bound is on the sender's wait.
func (m *Master) relayConn(from *child, msg *handoff.Message, fd int, deadline time.Time) *child {
	tried := map[*child]bool{from: true}
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return nil
		}
		m.mu.Lock()
		to := m.pickAdopterLocked(msg.Key, tried)
		if to == nil && m.adopterComingLocked(msg.Key, tried) {
			m.mu.Unlock()
			time.Sleep(adoptPoll)
			continue
		}
		var r *relay
		if to != nil {
			tried[to] = true
			m.nextConn++
			r = &relay{id: m.nextConn, to: to, taken: make(chan bool, 1)}
			m.relays[r.id] = r
			to.pending++
		}
		m.mu.Unlock()
		if to == nil {
			return nil
		}
		taken := false
		err := to.conn.SendWithin(left, &handoff.Message{V: handoff.Version, Type: handoff.TypeConn, Conn: r.id, Key: msg.Key, State: msg.State, Unread: msg.Unread}, fd)
		if left = time.Until(deadline); err == nil && left > 0 {
			t := time.NewTimer(min(left, acceptTimeout))
			select {
			case taken = <-r.taken:
			case <-to.done:
			case <-t.C:
			}
			t.Stop()
		}
		m.mu.Lock()
		if !r.decided {
			// No answer in time (or the adopter died): a late accept
			// now gets "no".
			r.decided = true
		} else if !taken {
			// The accept won the race against the timer: its answer is
			// in the channel already, and the adopter was told yes.
			select {
			case taken = <-r.taken:
			default:
			}
		}
		delete(m.relays, r.id)
		to.pending--
		if taken {
			to.adopted++
			m.connsHandedOver++
		}
		m.mu.Unlock()
		if taken {
			from.log.Debug("connection handed over", events.Key, events.ConnHandedOver, "key", msg.Key, "to_worker_id", to.ID)
			return to
		}
	}
}

// adopterComingLocked reports whether a ready worker of the serving
// generation that speaks the relay has not announced adoption of key yet,
// but may still: a program that says it is ready before it calls Adopt
// (ServeHTTP with NoReady) does so a moment later. Called with m.mu held.
func (m *Master) adopterComingLocked(key string, tried map[*child]bool) bool {
	g := m.serving
	if g == nil || m.stopping {
		return false
	}
	now := m.cfg.clock.now()
	for _, s := range g.slots {
		w := s.w
		if w != nil && !tried[w] && w.state == workerReadyState && w.conns && !w.adopts[key] && now.Sub(w.readyAt) < adoptWait {
			return true
		}
	}
	return false
}

// pickAdopterLocked returns the ready worker of the serving generation that
// adopts key, has not been tried, and has been given the fewest
// connections; nil if there is none. Called with m.mu held.
func (m *Master) pickAdopterLocked(key string, tried map[*child]bool) *child {
	g := m.serving
	if g == nil || m.stopping {
		return nil
	}
	var best *child
	for _, s := range g.slots {
		w := s.w
		if w == nil || tried[w] || w.state != workerReadyState || !w.adopts[key] {
			continue
		}
		if best == nil || w.adopted+w.pending < best.adopted+best.pending {
			best = w
		}
	}
	return best
}

// offeredTo reports whether connection id is being offered to w now: such
// an accept is not rate-limited.
func (w *child) offeredTo(id uint64) bool {
	w.m.mu.Lock()
	defer w.m.mu.Unlock()
	r := w.m.relays[id]
	return r != nil && r.to == w
}

// accept answers w's accept of connection id. A worker that accepts a
// connection the master never sent it has broken the protocol.
func (w *child) accept(msg *handoff.Message, reply *handoff.Message) bool {
	m := w.m
	m.mu.Lock()
	defer m.mu.Unlock()
	r := m.relays[msg.Conn]
	if r == nil {
		if msg.Conn > m.nextConn {
			return false
		}
		// Decided and forgotten: too late.
		if !msg.Refuse {
			reply.Errno, reply.Error = "ETIMEDOUT", "accept: the connection was given back to its sender"
		}
		return true
	}
	if r.to != w {
		return false
	}
	if r.decided {
		if !msg.Refuse {
			reply.Errno, reply.Error = "ETIMEDOUT", "accept: the connection was given back to its sender"
		}
		return true
	}
	r.decided = true
	r.taken <- !msg.Refuse
	return true
}
