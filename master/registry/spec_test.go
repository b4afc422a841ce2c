package registry

import (
	"os"
	"strings"
	"testing"
)

func TestParseListenSpec(t *testing.T) {
	wd, _ := os.Getwd()
	cases := []struct {
		in      string
		want    ListenSpec
		wantErr string
	}{
		{in: "tcp://:8080", want: ListenSpec{Network: "tcp", Address: ":8080", FD: -1}},
		{in: "tcp://127.0.0.1:0?name=http", want: ListenSpec{Network: "tcp", Address: "127.0.0.1:0", FD: -1, Name: "http"}},
		{in: "tcp6://[::1]:443", want: ListenSpec{Network: "tcp6", Address: "[::1]:443", FD: -1}},
		{in: "udp://127.0.0.1:53", want: ListenSpec{Network: "udp", Address: "127.0.0.1:53", FD: -1}},
		{in: "unix:///run/app.sock?mode=0660", want: ListenSpec{Network: "unix", Address: "/run/app.sock", FD: -1, Mode: 0o660}},
		{in: "unix://app.sock", want: ListenSpec{Network: "unix", Address: wd + "/app.sock", FD: -1}},
		{in: "unixgram://@abstract", want: ListenSpec{Network: "unixgram", Address: "@abstract", FD: -1}},
		{in: "fd://3", want: ListenSpec{Network: "fd", FD: 3}},
		{in: "fd://web?name=http", want: ListenSpec{Network: "fd", FD: -1, FDName: "web", Name: "http"}},
		{in: ":8080", wantErr: "want SCHEME://ADDRESS"},
		{in: "sctp://:1", wantErr: `unknown scheme "sctp"`},
		{in: "tcp://8080", wantErr: "want HOST:PORT"},
		{in: "tcp://:99999", wantErr: "bad port"},
		{in: "tcp://:80?mode=0600", wantErr: "unix sockets only"},
		{in: "unix:///x?mode=rw", wantErr: "octal file mode"},
		{in: "unix:///x?colour=red", wantErr: `unknown parameter "colour"`},
		{in: "tcp://:80?name=", wantErr: "1 to 255"},
		{in: "tcp://:80?name=a%20b", wantErr: "printable ASCII"},
		{in: "fd://1", wantErr: "stdio"},
		{in: "unix://", wantErr: "empty unix socket path"},
	}
	for _, tc := range cases {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseListenSpec(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), tc.in) {
					t.Fatalf("err %v, want one naming %q and containing %q", err, tc.in, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.want.Spec = tc.in
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}
