package handoff

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// CheckListener reports whether descriptor fd is what a listen may be
// served from: a listening stream socket, or (packet) a datagram socket.
// net.FileListener alone accepts a bound socket that is not listening, and
// Accept then fails much later. The error wraps EPROTOTYPE for the wrong
// kind of socket, EINVAL for a stream socket that does not listen, and the
// getsockopt error (ENOTSOCK, EBADF) for anything else.
func CheckListener(fd int, packet bool) error {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return fmt.Errorf("fd %d is not a socket: %w", fd, err)
	}
	if isPacket := typ == unix.SOCK_DGRAM; isPacket != packet {
		if packet {
			return fmt.Errorf("fd %d is a stream socket, not a packet socket: %w", fd, unix.EPROTOTYPE)
		}
		return fmt.Errorf("fd %d is a datagram socket: use ListenPacket: %w", fd, unix.EPROTOTYPE)
	}
	if !packet {
		acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
		if err != nil {
			return fmt.Errorf("fd %d: %w", fd, err)
		}
		if acc == 0 {
			return fmt.Errorf("fd %d is a socket that is not listening: %w", fd, unix.EINVAL)
		}
	}
	return nil
}

// CheckConn reports whether descriptor fd may be relayed as a connection
// accepted from a listening socket that is bound to localPort (0 for a
// unix socket): a connected stream socket of the listener's family, not a
// listener, whose local port is localPort. A worker that hands over
// anything else (a file, a pipe, a listening or datagram socket, a
// connection of another port) gets an error and keeps its descriptor.
// Errors wrap EPROTOTYPE, EINVAL or ENOTCONN, or the getsockopt error.
func CheckConn(fd int, unixFamily bool, localPort int) error {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return fmt.Errorf("not a socket: %w", err)
	}
	if typ != unix.SOCK_STREAM {
		return fmt.Errorf("not a stream socket: %w", unix.EPROTOTYPE)
	}
	if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc != 0 {
		return fmt.Errorf("a listening socket, not a connection: %w", unix.EINVAL)
	}
	dom, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil {
		return fmt.Errorf("socket domain: %w", err)
	}
	if isUnix := dom == unix.AF_UNIX; isUnix != unixFamily || (!isUnix && dom != unix.AF_INET && dom != unix.AF_INET6) {
		return fmt.Errorf("a socket of another family than its listener: %w", unix.EPROTOTYPE)
	}
	if _, err := unix.Getpeername(fd); err != nil {
		return fmt.Errorf("not connected: %w", err)
	}
	if unixFamily {
		return nil
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return fmt.Errorf("local address: %w", err)
	}
	port := -1
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		port = a.Port
	case *unix.SockaddrInet6:
		port = a.Port
	}
	if port != localPort {
		return fmt.Errorf("a connection to port %d, not to its listener's port %d: %w", port, localPort, unix.EINVAL)
	}
	return nil
}
