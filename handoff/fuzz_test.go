package handoff

import (
	"encoding/binary"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// FuzzDecode feeds arbitrary records and control data to the decoder. It
// checks that the decoder never panics, that a record it accepts is valid and
// survives a round trip, and that on rejection every descriptor named in the
// control data is handed to the closer exactly once, and none is returned.
func FuzzDecode(f *testing.F) {
	seeds := []string{
		`{"v":1,"type":"hello","seq":1,"pid":42}`,
		`{"v":1,"type":"listen","seq":2,"listen":{"network":"tcp","address":":0","index":1}}`,
		`{"v":1,"type":"listen","seq":3,"listen":{"fd":7,"packet":true}}`,
		`{"v":1,"type":"listen","seq":4,"listen":{"network":"unixgram","address":"/tmp/x","packet":true}}`,
		`{"v":1,"type":"ready","seq":5}`,
		`{"v":1,"type":"reply","reply_to":2,"network":"tcp","address":"[::]:8080"}`,
		`{"v":1,"type":"reply","reply_to":2,"errno":"EADDRINUSE","error":"address already in use"}`,
		`{"v":1,"type":"drain","timeout_ms":30000}`,
		`{"v":2,"type":"ready","seq":1}`,
		`{"v":1,"type":"ready"}`,
		`{}`, `[]`, `null`, `{"v":1,"type":"listen","seq":1,"listen":null}`,
	}
	rights := unix.UnixRights(5, 6)
	bogus := make([]byte, unix.CmsgSpace(4))
	binary.NativeEndian.PutUint64(bogus, 9999) // length past the end
	for _, s := range seeds {
		f.Add([]byte(s), []byte(nil), 0)
		f.Add([]byte(s), rights, 0)
		f.Add([]byte(s), rights, unix.MSG_CTRUNC)
		f.Add([]byte(s), bogus, 0)
	}
	f.Fuzz(func(t *testing.T, data, oob []byte, flags int) {
		want, _ := parseControl(oob)
		closed := map[int]int{}
		m, fds, err := decode(data, oob, flags, func(fd int) { closed[fd]++ })
		if err != nil {
			if m != nil || fds != nil {
				t.Fatalf("error %v with message %v fds %v", err, m, fds)
			}
			got := 0
			for _, n := range closed {
				got += n
			}
			if got != len(want) {
				t.Fatalf("closed %d fds, control data held %d", got, len(want))
			}
			return
		}
		if len(closed) != 0 {
			t.Fatalf("closed fds %v on success", closed)
		}
		if len(fds) != len(want) || len(fds) > MaxFDs {
			t.Fatalf("returned %d fds, control data held %d", len(fds), len(want))
		}
		if err := m.Validate(); err != nil {
			t.Fatalf("accepted an invalid message: %v", err)
		}
		b, err := Marshal(m)
		if err != nil {
			t.Fatalf("accepted message does not re-encode: %v", err)
		}
		m2, err := Unmarshal(b)
		if err != nil {
			t.Fatalf("re-encoded message does not decode: %v", err)
		}
		if m2.Type != m.Type || m2.Seq != m.Seq || m2.ReplyTo != m.ReplyTo {
			t.Fatalf("round trip changed the message: %+v vs %+v", m, m2)
		}
		if m.Type == TypeListen {
			// Normalisation must not panic on anything the decoder accepts.
			// Skip host names: they would make the fuzzer query DNS.
			if noDNS(m.Listen) {
				_, _ = Normalize(m.Listen)
			}
		}
	})
}

// noDNS reports whether normalising r cannot reach the resolver.
func noDNS(r *ListenRequest) bool {
	if r.FD != nil || strings.HasPrefix(r.Network, "unix") {
		return true
	}
	host, port, err := net.SplitHostPort(r.Address)
	if err != nil {
		return true
	}
	if _, err := strconv.Atoi(port); err != nil {
		return false
	}
	if host == "" {
		return true
	}
	_, err = netip.ParseAddr(host)
	return err == nil
}
