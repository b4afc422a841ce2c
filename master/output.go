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
)

// maxLine bounds one relayed line; a longer one is cut into pieces of
// this size.
const maxLine = 64 << 10

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
// outputPipes returned) to the master's, attributed to w, until the worker
// and whatever it left running have closed them.
func (m *Master) relay(r [2]*os.File, w *child) {
	if r[0] == nil {
		return
	}
	for i, dst := range []*os.File{m.cfg.stdout, m.cfg.stderr} {
		stream := [2]string{"stdout", "stderr"}[i]
		go m.relayStream(r[i], dst, stream, w)
	}
}

// outMu keeps relayed lines whole when several workers write at once.
var outMu sync.Mutex

func (m *Master) relayStream(r *os.File, dst io.Writer, stream string, w *child) {
	defer r.Close()
	br := bufio.NewReaderSize(r, maxLine)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			b := m.formatLine(bytes.TrimSuffix(line, []byte("\n")), stream, w)
			outMu.Lock()
			dst.Write(b)
			outMu.Unlock()
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
			"@timestamp": time.Now().UTC().Format("2006-01-02T15:04:05.000Z07:00"),
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
	return fmt.Appendf(nil, "[gen %d slot %d pid %d] %s\n", w.gen.Num, w.Slot, w.pid, line)
}
