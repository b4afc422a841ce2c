package registry

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ListenSpec is one pre-opened listener (the --listen flag): the master
// opens it before the first generation, keeps it for its whole life, and
// passes it to every worker as one of the fds 3..3+L-1 of the systemd
// socket-activation protocol.
//
// Forms:
//
//	tcp://HOST:PORT   tcp4://  tcp6://[::1]:PORT   (PORT may be 0)
//	udp://HOST:PORT   udp4://  udp6://
//	unix:///abs/path  unixpacket:///abs/path  unixgram:///abs/path
//	unix://@abstract
//	fd://N            the master's inherited descriptor N
//	fd://NAME         the inherited descriptor systemd named NAME
//
// followed by optional query parameters: name=NAME (for LISTEN_FDNAMES)
// and, for unix sockets, mode=0660 (the socket file's mode). A relative
// unix path is taken from the master's working directory.
type ListenSpec struct {
	// Spec is the text as given.
	Spec string
	// Network is the net network, or "fd" for an inherited descriptor.
	Network string
	// Address is HOST:PORT or the unix path.
	Address string
	// FD is the inherited descriptor for fd://N, else -1.
	FD int
	// FDName is the systemd name for fd://NAME.
	FDName string
	// Name is the LISTEN_FDNAMES entry ("" until resolved: then the fd's
	// systemd name, or "unknown").
	Name string
	// Mode is the unix socket file's mode; 0 leaves it to the umask.
	Mode os.FileMode
}

// ParseListenSpec parses one --listen value. Errors name the spec and say
// what is wrong with it.
func ParseListenSpec(s string) (ListenSpec, error) {
	ls := ListenSpec{Spec: s, FD: -1}
	bad := func(format string, a ...any) (ListenSpec, error) {
		return ListenSpec{}, fmt.Errorf("--listen %q: %s", s, fmt.Sprintf(format, a...))
	}
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		return bad("want SCHEME://ADDRESS, e.g. tcp://:8080, udp://127.0.0.1:53, unix:///run/app.sock or fd://3")
	}
	rest, query, _ := strings.Cut(rest, "?")
	q, err := url.ParseQuery(query)
	if err != nil {
		return bad("bad query: %v", err)
	}
	for k, v := range q {
		if len(v) != 1 {
			return bad("parameter %q given %d times", k, len(v))
		}
		switch k {
		case "name":
			if err := checkFDName(v[0]); err != nil {
				return bad("%v", err)
			}
			ls.Name = v[0]
		case "mode":
			if !strings.HasPrefix(scheme, "unix") {
				return bad("mode= applies to unix sockets only")
			}
			m, err := strconv.ParseUint(v[0], 8, 32)
			if err != nil || m > 0o777 || m == 0 {
				return bad("mode %q is not an octal file mode like 0660", v[0])
			}
			ls.Mode = os.FileMode(m)
		default:
			return bad("unknown parameter %q (want name= or mode=)", k)
		}
	}
	switch scheme {
	case "tcp", "tcp4", "tcp6", "udp", "udp4", "udp6":
		host, port, err := net.SplitHostPort(rest)
		if err != nil {
			return bad("want HOST:PORT (e.g. :8080, 127.0.0.1:0, [::1]:443): %v", err)
		}
		if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			if _, lerr := net.LookupPort(scheme, port); lerr != nil {
				return bad("bad port %q", port)
			}
		}
		ls.Network, ls.Address = scheme, net.JoinHostPort(host, port)
	case "unix", "unixpacket", "unixgram":
		if rest == "" {
			return bad("empty unix socket path")
		}
		p := rest
		if !strings.HasPrefix(p, "@") && !filepath.IsAbs(p) {
			abs, err := filepath.Abs(p)
			if err != nil {
				return bad("%v", err)
			}
			p = abs
		}
		ls.Network, ls.Address = scheme, p
		if strings.HasPrefix(p, "@") && ls.Mode != 0 {
			return bad("mode= does not apply to an abstract socket")
		}
	case "fd":
		ls.Network = "fd"
		if n, err := strconv.Atoi(rest); err == nil {
			if n < 3 {
				return bad("fd %d is stdio; inherited sockets start at 3", n)
			}
			ls.FD = n
		} else {
			if err := checkFDName(rest); err != nil {
				return bad("%v", err)
			}
			ls.FDName = rest
		}
	default:
		return bad("unknown scheme %q (want tcp, tcp4, tcp6, udp, udp4, udp6, unix, unixpacket, unixgram or fd)", scheme)
	}
	return ls, nil
}

// checkFDName checks a LISTEN_FDNAMES entry as systemd does: 1 to 255
// printable ASCII characters, no ':'.
func checkFDName(n string) error {
	if n == "" || len(n) > 255 {
		return fmt.Errorf("fd name %q must be 1 to 255 characters", n)
	}
	for _, c := range n {
		if c <= ' ' || c >= 0x7f || c == ':' {
			return fmt.Errorf("fd name %q may hold only printable ASCII without spaces or ':'", n)
		}
	}
	return nil
}

// packet reports whether the spec is a datagram socket.
func (ls ListenSpec) packet() bool {
	return strings.HasPrefix(ls.Network, "udp") || ls.Network == "unixgram"
}
