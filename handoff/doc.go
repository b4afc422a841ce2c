// Package handoff owns the wire between a gorolling master and its workers:
// the message types, their JSON encoding, the framing over a SOCK_SEQPACKET
// socketpair, file-descriptor passing with SCM_RIGHTS, and the normalisation
// of listen requests into registry keys.
//
// The package knows nothing about processes or generations and does no
// logging. PROTOCOL.md beside this file documents the bytes for workers
// written in other languages.
//
// Invariants:
//   - One message is one JSON object in one SEQPACKET record, at most
//     MaxMessageSize bytes, with at most MaxFDs descriptors attached.
//   - Every descriptor Receive returns is close-on-exec and belongs to the
//     caller. On any decoding failure Receive closes every descriptor that
//     arrived with the record before it returns the error, so a misbehaving
//     peer cannot make the receiver leak descriptors.
//   - Send never takes ownership of the descriptors it is given: the kernel
//     duplicates them into the peer and the caller keeps its own.
package handoff
