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
