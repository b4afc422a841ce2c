package handoff

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Version is the protocol version this package speaks. Every message carries
// it in its "v" field; a message with another version is rejected.
const Version = 1

// MaxMessageSize is the largest message, in bytes, either side sends or
// accepts. A larger record is a protocol violation.
const MaxMessageSize = 64 << 10

// MaxFDs is the largest number of descriptors attached to one message.
// The master attaches at most one (to a listen reply or a conn); a worker
// attaches one to a handoff and none to anything else.
const MaxFDs = 4

// MaxIndex bounds the per-worker listen index (see ListenRequest.Index).
const MaxIndex = 1023

// MaxAddressLen bounds the address string of a listen request.
const MaxAddressLen = 4096

// MaxKeyLen bounds the key string of an adopt or handoff message: a key is
// a network, an address of at most MaxAddressLen bytes and a short suffix.
const MaxKeyLen = MaxAddressLen + 64

// MaxStateSize bounds the application state that travels with a handed-over
// connection, and MaxUnreadSize the bytes its sender read but did not
// process. Both fit one message (base64 grows them by a third).
const (
	MaxStateSize  = 16 << 10
	MaxUnreadSize = 16 << 10
)

// FeatureConns, in a hello reply's Features, says the master relays
// connections between workers (adopt, handoff, conn and accept). A worker
// sends none of those messages to a master that did not say so.
const FeatureConns = "conns"

// Message types. Requests travel from worker to master and carry a
// sequence number; the master answers each with a TypeReply naming it.
const (
	// TypeHello is the first message a worker may send; it carries its pid.
	TypeHello = "hello"
	// TypeListen asks the master for a shared socket.
	TypeListen = "listen"
	// TypeReady tells the master the worker is ready to serve.
	TypeReady = "ready"
	// TypeReply answers a request. A successful listen reply carries the
	// socket as one SCM_RIGHTS descriptor.
	TypeReply = "reply"
	// TypeDrain tells a worker to stop accepting, finish what it has and
	// exit within TimeoutMS milliseconds.
	TypeDrain = "drain"

	// TypeAdopt tells the master that the worker adopts connections handed
	// over for the socket Key.
	TypeAdopt = "adopt"
	// TypeHandoff offers the master a connected socket (one SCM_RIGHTS
	// descriptor) of the socket Key, with its State and Unread bytes. The
	// reply comes once a worker of the serving generation has taken it, or
	// once none did.
	TypeHandoff = "handoff"
	// TypeConn brings a worker a handed-over connection (one descriptor),
	// numbered Conn. The worker must not read or write it before the
	// master has answered its TypeAccept.
	TypeConn = "conn"
	// TypeAccept takes (or, with Refuse, declines) the connection Conn.
	TypeAccept = "accept"
)

// Sentinel errors. Decoding errors wrap ErrMalformed; callers test with
// errors.Is.
var (
	// ErrMalformed reports a message that is not valid protocol.
	ErrMalformed = errors.New("handoff: malformed message")
	// ErrVersion reports a message with an unsupported protocol version.
	ErrVersion = errors.New("handoff: unsupported protocol version")
	// ErrTruncated reports a record or its control data cut short by the
	// kernel (MSG_TRUNC or MSG_CTRUNC).
	ErrTruncated = errors.New("handoff: truncated message")
	// ErrTooLarge reports a message that exceeds MaxMessageSize.
	ErrTooLarge = errors.New("handoff: message too large")
)

// Message is one protocol message. Which fields are meaningful depends on
// Type; Validate checks the combination. Unknown JSON fields are ignored so
// that later minor additions do not break older peers.
type Message struct {
	// V is the protocol version, always Version.
	V int `json:"v"`
	// Type is one of the Type constants.
	Type string `json:"type"`
	// Seq numbers a request; it starts at 1 and increases with every
	// request a worker sends.
	Seq uint64 `json:"seq,omitempty"`
	// ReplyTo names the request a reply answers.
	ReplyTo uint64 `json:"reply_to,omitempty"`

	// PID is the sender's process id (hello).
	PID int `json:"pid,omitempty"`

	// Listen is the request of a TypeListen message.
	Listen *ListenRequest `json:"listen,omitempty"`

	// Errno is the symbolic errno name ("EADDRINUSE") of a failed request.
	Errno string `json:"errno,omitempty"`
	// Error is the human-readable error of a failed request.
	Error string `json:"error,omitempty"`
	// Network and Address describe the socket a successful listen reply
	// carries: the bound local address (the real port for port 0).
	Network string `json:"network,omitempty"`
	Address string `json:"address,omitempty"`

	// TimeoutMS is the drain deadline, in milliseconds from receipt.
	TimeoutMS int64 `json:"timeout_ms,omitempty"`

	// Conns, in a hello, says the worker may hand connections over when it
	// drains. Features, in the reply to a hello, lists what the master
	// supports (FeatureConns).
	Conns    bool     `json:"conns,omitempty"`
	Features []string `json:"features,omitempty"`

	// Key names a socket of the master: a listen reply gives it, and adopt,
	// handoff and conn messages refer to it.
	Key string `json:"key,omitempty"`
	// Conn numbers a connection the master relays (conn, accept).
	Conn uint64 `json:"conn,omitempty"`
	// State is the application's opaque state of a handed-over connection,
	// at most MaxStateSize bytes; Unread are the bytes its sender read from
	// the socket but did not process, at most MaxUnreadSize bytes. The
	// adopter processes Unread before anything it reads from the socket.
	// In JSON both are standard base64.
	State  []byte `json:"state,omitempty"`
	Unread []byte `json:"unread,omitempty"`
	// Refuse, in an accept, declines the connection.
	Refuse bool `json:"refuse,omitempty"`
	// AdoptedBy, in the reply to a handoff, is the id of the worker that
	// took the connection.
	AdoptedBy int `json:"adopted_by,omitempty"`
}

// ListenRequest asks for one socket. Either Address or FD names it.
type ListenRequest struct {
	// Network is tcp, tcp4, tcp6, udp, udp4, udp6, unix, unixpacket or
	// unixgram; for an FD request it may be empty.
	Network string `json:"network,omitempty"`
	// Address is the address as net.Listen takes it. Unix paths must be
	// absolute (a worker resolves relative paths against its own working
	// directory before asking).
	Address string `json:"address,omitempty"`
	// FD, when set, asks for the master's own descriptor FD (Node's
	// listen({fd})), an inherited socket.
	FD *int `json:"fd,omitempty"`
	// Packet is true for a datagram socket (ListenPacket).
	Packet bool `json:"packet,omitempty"`
	// Index counts, per worker, the requests for the same normalised
	// address that the worker already holds: the k-th listen on ":0" has
	// index k-1 and gets the same port in every worker and generation.
	Index int `json:"index,omitempty"`
}

// IsRequest reports whether t is a worker-to-master request type.
func IsRequest(t string) bool {
	switch t {
	case TypeHello, TypeListen, TypeReady, TypeAdopt, TypeHandoff, TypeAccept:
		return true
	}
	return false
}

// Validate checks that m is a well-formed message of a known type. It does
// not check the direction: the receiver decides which types it accepts.
func (m *Message) Validate() error {
	if m.V != Version {
		return fmt.Errorf("%w: got %d, want %d", ErrVersion, m.V, Version)
	}
	switch m.Type {
	case TypeHello, TypeReady:
		if m.Seq == 0 {
			return fmt.Errorf("%w: %s without seq", ErrMalformed, m.Type)
		}
		if m.PID < 0 {
			return fmt.Errorf("%w: negative pid", ErrMalformed)
		}
	case TypeListen:
		if m.Seq == 0 {
			return fmt.Errorf("%w: listen without seq", ErrMalformed)
		}
		if m.Listen == nil {
			return fmt.Errorf("%w: listen without request", ErrMalformed)
		}
		if err := m.Listen.validate(); err != nil {
			return err
		}
	case TypeAdopt, TypeHandoff:
		if m.Seq == 0 {
			return fmt.Errorf("%w: %s without seq", ErrMalformed, m.Type)
		}
		if err := m.checkConnFields(); err != nil {
			return err
		}
	case TypeAccept:
		if m.Seq == 0 || m.Conn == 0 {
			return fmt.Errorf("%w: accept without seq or conn", ErrMalformed)
		}
	case TypeConn:
		if m.Conn == 0 {
			return fmt.Errorf("%w: conn without a number", ErrMalformed)
		}
		if err := m.checkConnFields(); err != nil {
			return err
		}
	case TypeReply:
		if m.ReplyTo == 0 {
			return fmt.Errorf("%w: reply without reply_to", ErrMalformed)
		}
	case TypeDrain:
		if m.TimeoutMS < 0 {
			return fmt.Errorf("%w: negative drain timeout", ErrMalformed)
		}
	default:
		return fmt.Errorf("%w: unknown type %q", ErrMalformed, m.Type)
	}
	return nil
}

// checkConnFields checks the key, state and unread bytes of an adopt,
// handoff or conn message.
func (m *Message) checkConnFields() error {
	if m.Key == "" || len(m.Key) > MaxKeyLen {
		return fmt.Errorf("%w: %s needs a key of 1 to %d bytes", ErrMalformed, m.Type, MaxKeyLen)
	}
	if len(m.State) > MaxStateSize {
		return fmt.Errorf("%w: state of %d bytes, at most %d", ErrMalformed, len(m.State), MaxStateSize)
	}
	if len(m.Unread) > MaxUnreadSize {
		return fmt.Errorf("%w: %d unread bytes, at most %d", ErrMalformed, len(m.Unread), MaxUnreadSize)
	}
	return nil
}

func (r *ListenRequest) validate() error {
	if r.Index < 0 || r.Index > MaxIndex {
		return fmt.Errorf("%w: index %d out of range 0..%d", ErrMalformed, r.Index, MaxIndex)
	}
	if len(r.Address) > MaxAddressLen {
		return fmt.Errorf("%w: address longer than %d bytes", ErrMalformed, MaxAddressLen)
	}
	if r.FD != nil {
		if *r.FD < 0 {
			return fmt.Errorf("%w: negative fd", ErrMalformed)
		}
		if r.Address != "" {
			return fmt.Errorf("%w: both fd and address", ErrMalformed)
		}
		if r.Network != "" {
			if _, err := networkKind(r.Network, r.Packet); err != nil {
				return err
			}
		}
		return nil
	}
	if _, err := networkKind(r.Network, r.Packet); err != nil {
		return err
	}
	return nil
}

// networkKind checks that network is one we share and that it agrees with
// packet. It returns the network's base: "tcp", "udp" or "unix".
func networkKind(network string, packet bool) (string, error) {
	var base string
	var isPacket bool
	switch network {
	case "tcp", "tcp4", "tcp6":
		base = "tcp"
	case "udp", "udp4", "udp6":
		base, isPacket = "udp", true
	case "unix", "unixpacket":
		base = "unix"
	case "unixgram":
		base, isPacket = "unix", true
	default:
		return "", fmt.Errorf("%w: unknown network %q", ErrMalformed, network)
	}
	if isPacket != packet {
		if packet {
			return "", fmt.Errorf("%w: network %q is not a packet network", ErrMalformed, network)
		}
		return "", fmt.Errorf("%w: network %q needs a packet listen", ErrMalformed, network)
	}
	return base, nil
}

// Marshal encodes m after validating it.
func Marshal(m *Message) ([]byte, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("handoff: encode %s: %w", m.Type, err)
	}
	if len(b) > MaxMessageSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrTooLarge, len(b))
	}
	return b, nil
}

// Unmarshal decodes and validates one message. It accepts exactly one JSON
// object: trailing data is an error.
func Unmarshal(data []byte) (*Message, error) {
	if len(data) > MaxMessageSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrTooLarge, len(data))
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	var m Message
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: trailing data after the object", ErrMalformed)
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return &m, nil
}
