package master

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"testing"

	"golang.org/x/time/rate"
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
			wr.WriteString("one\ntwo \xff\x00\r\x1b[2J\n" + long + "\nlast")
			wr.Close()
		}()
		var out bytes.Buffer
		m.relayStream(r, &out, "stderr", w, nil)
		lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
		// The long line comes in pieces of maxLine.
		want := 3 + (len(long)+maxLine-1)/maxLine
		if len(lines) != want {
			t.Fatalf("format %d: %d lines, want %d (one, two, the long one in pieces, last)", format, len(lines), want)
		}
		if format == OutputPrefixed {
			if lines[0] != "[gen 3 slot 1 pid 4242] one" || lines[len(lines)-1] != "[gen 3 slot 1 pid 4242] last" {
				t.Errorf("prefixed: %q ... %q", lines[0], lines[len(lines)-1])
			}
			if lines[1] != "[gen 3 slot 1 pid 4242] two \xff\\x00\\x0d\\x1b[2J" {
				t.Errorf("control bytes not made inert: %q", lines[1])
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
		total := 0
		for _, m := range msgs[2 : len(msgs)-1] {
			total += len(m)
		}
		if msgs[0] != "one" || msgs[1] != "two \ufffd\x00\r\x1b[2J" || total != len(long) || msgs[len(msgs)-1] != "last" {
			t.Errorf("messages %q", []string{msgs[0], msgs[1], msgs[len(msgs)-1]})
		}
	}
}

// TestRelayRateLimit: a worker writing lines faster than outputRate loses
// the excess, and the count of what was dropped is relayed.
func TestRelayRateLimit(t *testing.T) {
	m := &Master{cfg: Config{Output: OutputPrefixed}}
	w := &child{ID: 1, Slot: 0, pid: 99, gen: &Generation{Num: 1}}
	r, wr, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		wr.WriteString(strings.Repeat("spam\n", outputBurst*3))
		wr.Close()
	}()
	var out bytes.Buffer
	// A limiter that refills slowly: the burst passes, then almost nothing.
	m.relayStream(r, &out, "stdout", w, rate.NewLimiter(1, outputBurst))
	n := strings.Count(out.String(), "] spam\n")
	if n < outputBurst || n > outputBurst+5 {
		t.Errorf("%d lines relayed of %d, want the burst of %d", n, outputBurst*3, outputBurst)
	}
}
