package master

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Output says how workers' output reaches the master's stdout and stderr.
type Output int

const (
	// OutputDirect gives workers the master's stdout and stderr: their
	// lines go out as they wrote them, unattributed.
	OutputDirect Output = iota
	// OutputPrefixed relays each line through the master with a prefix
	// naming the worker: "[gen 3 slot 1 pid 4242] ...".
	OutputPrefixed
	// OutputJSON relays each line as a JSON record in the master's own log
	// format (hclog's JSON), with the worker's generation, slot, pid, id
	// and the stream.
	OutputJSON
	// OutputRelayed relays each line as it was written, with its control
	// bytes made inert: for workers of another account when the master's
	// output is a terminal, which they must not hold (with the terminal's
	// descriptor a worker could stop its output, and the master with it,
	// or send it escape sequences).
	OutputRelayed
)

// outputGrace is how long the relay goes on reading a worker's pipes
// after the worker exited (for what it wrote just before); then it closes
// them, even if a process the worker left behind still holds them.
const outputGrace = time.Second

// maxLine bounds one relayed line; a longer one is cut into pieces of
// this size. It stays well under journald's line limit (48 KiB by
// default), past which journald would start a record of its own in the
// middle of a worker's line, without the prefix.
const maxLine = 8 << 10

// Relayed output is bounded per worker: past outputRate lines a second
// (with bursts of outputBurst), lines are dropped and counted, and the
// count is relayed once lines flow again, so that one worker writing
// newlines as fast as it can cannot keep the master busy.
const (
	outputRate  = 2000
	outputBurst = 4000
)

// outputPipes returns the worker's stdout and stderr and, when they are
// relayed, the read ends the relay takes. With OutputDirect the master's
// own files are returned and r is nil.
func (m *Master) outputPipes() (stdout, stderr *os.File, r [2]*os.File, err error) {
	if m.cfg.Output == OutputDirect {
		return m.cfg.stdout, m.cfg.stderr, r, nil
	}
	var w [2]*os.File
	for i := range r {
		if r[i], w[i], err = os.Pipe(); err != nil {
			for j := 0; j < i; j++ {
				r[j].Close()
				w[j].Close()
			}
			return nil, nil, [2]*os.File{}, fmt.Errorf("worker output pipe: %w", err)
		}
	}
	return w[0], w[1], r, nil
}

// relay copies the lines of a worker's stdout and stderr (the read ends
// outputPipes returned) to the master's, attributed to w, until they are
// closed: at end of file, or outputGrace after the worker exited (see
// child.wait), whichever comes first.
func (m *Master) relay(r [2]*os.File, w *child) {
	if r[0] == nil {
		return
	}
	lim := rate.NewLimiter(outputRate, outputBurst) // both streams of the worker
	for i, dst := range []*os.File{m.cfg.stdout, m.cfg.stderr} {
		stream := [2]string{"stdout", "stderr"}[i]
		go m.relayStream(r[i], dst, stream, w, lim)
	}
}

// outMu keeps relayed lines whole when several workers write at once.
var outMu sync.Mutex

func (m *Master) relayStream(r *os.File, dst io.Writer, stream string, w *child, lim *rate.Limiter) {
	defer r.Close()
	br := bufio.NewReaderSize(r, maxLine)
	dropped := 0
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			if lim != nil && !lim.Allow() {
				dropped++
			} else {
				var b []byte
				if dropped > 0 {
					b = m.formatLine([]byte(fmt.Sprintf("gorolling: %d lines of this worker's %s dropped (more than %d a second)", dropped, stream, outputRate)), stream, w)
					dropped = 0
				}
				b = append(b, m.formatLine(bytes.TrimSuffix(line, []byte("\n")), stream, w)...)
				outMu.Lock()
				dst.Write(b)
				outMu.Unlock()
			}
		}
		if err != nil && err != bufio.ErrBufferFull {
			return
		}
	}
}

// formatLine renders one line of a worker's output.
func (m *Master) formatLine(line []byte, stream string, w *child) []byte {
	if m.cfg.Output == OutputJSON {
		rec := map[string]any{
			"@timestamp": time.Now().Format("2006-01-02T15:04:05.000Z07:00"), // as hclog writes it
			"@level":     "info",
			"@module":    "worker",
			"@message":   string(line), // Marshal makes invalid UTF-8 valid
			"generation": w.gen.Num,
			"slot":       w.Slot,
			"pid":        w.pid,
			"worker_id":  w.ID,
			"stream":     stream,
		}
		b, _ := json.Marshal(rec)
		return append(b, '\n')
	}
	if m.cfg.Output == OutputRelayed {
		return append(inert(line), '\n')
	}
	return fmt.Appendf(nil, "[gen %d slot %d pid %d] %s\n", w.gen.Num, w.Slot, w.pid, inert(line))
}

// inert escapes the control bytes of a text line (tab aside) as \xNN: a
// carriage return, a NUL (at which journald cuts a record) or a terminal
// escape must not let a worker's line pass for another, unprefixed one.
func inert(line []byte) []byte {
	out := make([]byte, 0, len(line))
	for _, c := range line {
		if (c < 0x20 && c != '\t') || c == 0x7f {
			out = fmt.Appendf(out, "\\x%02x", c)
			continue
		}
		out = append(out, c)
	}
	return out
}
