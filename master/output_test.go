package master

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"testing"
)

// TestRelayLines: relayed lines keep their order, get the worker's prefix
// (or become JSON records with invalid UTF-8 made valid), a line longer
// than maxLine is cut into pieces, and a last line without a newline is
// still relayed.
func TestRelayLines(t *testing.T) {
	for _, format := range []Output{OutputPrefixed, OutputJSON} {
		m := &Master{cfg: Config{Output: format}}
		w := &child{ID: 7, Slot: 1, pid: 4242, gen: &Generation{Num: 3}}
		r, wr, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		long := strings.Repeat("x", maxLine+10)
		go func() {
			wr.WriteString("one\ntwo \xff\n" + long + "\nlast")
			wr.Close()
		}()
		var out bytes.Buffer
		m.relayStream(r, &out, "stderr", w)
		lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
		if len(lines) != 5 {
			t.Fatalf("format %d: %d lines, want 5 (one, two, the long one in 2 pieces, last)", format, len(lines))
		}
		if format == OutputPrefixed {
			if lines[0] != "[gen 3 slot 1 pid 4242] one" || lines[4] != "[gen 3 slot 1 pid 4242] last" {
				t.Errorf("prefixed: %q ... %q", lines[0], lines[4])
			}
			continue
		}
		var msgs []string
		for _, l := range lines {
			var rec map[string]any
			if err := json.Unmarshal([]byte(l), &rec); err != nil {
				t.Fatalf("not JSON: %q", l)
			}
			if rec["generation"] != 3.0 || rec["slot"] != 1.0 || rec["pid"] != 4242.0 || rec["worker_id"] != 7.0 || rec["stream"] != "stderr" || rec["@module"] != "worker" {
				t.Errorf("record %v", rec)
			}
			msgs = append(msgs, rec["@message"].(string))
		}
		if msgs[0] != "one" || msgs[1] != "two \ufffd" || len(msgs[2])+len(msgs[3]) != len(long) || msgs[4] != "last" {
			t.Errorf("messages %q", []string{msgs[0], msgs[1], msgs[4]})
		}
	}
}
