// Package metrics owns the master's Prometheus metrics: the counters of
// finished upgrades, kept as they happen, and the gauges read from the
// master's status at every scrape, written in the Prometheus text format
// (through github.com/VictoriaMetrics/metrics, which adds two small
// modules to the build, where client_golang would add its protobuf
// runtime). Only the master imports it; the worker package never does.
//
// Counters start at zero in every master process, a self-upgrade's
// successor included: Prometheus treats that as a counter reset. The
// service's own totals across masters (master upgrades and restarts) come
// from the status, which carries them over.
package metrics

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	vm "github.com/VictoriaMetrics/metrics"
	"github.com/gorolling/gorolling/master/control"
	"github.com/gorolling/gorolling/master/procfs"
)

// Metrics collects the master's metrics. Its methods are safe for
// concurrent use.
type Metrics struct {
	status func() control.Status
	set    *vm.Set
	dur    *vm.PrometheusHistogram

	mu         sync.Mutex
	upgrades   map[[2]string]*vm.Counter // kind, outcome
	rollbacks  *vm.Counter
	lastReason string
	lastRollAt time.Time
	version    string
}

// Outcomes of an upgrade, as the "outcome" label gives them.
const (
	outcomeOK         = "ok"
	outcomeRolledBack = "rolled_back"
)

// New returns the metrics of a master whose status status returns, and of
// gorolling version.
func New(status func() control.Status, version string) *Metrics {
	set := vm.NewSet()
	m := &Metrics{
		status:    status,
		set:       set,
		dur:       set.NewPrometheusHistogramExt("gorolling_upgrade_duration_seconds", []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}),
		upgrades:  map[[2]string]*vm.Counter{},
		rollbacks: set.NewCounter("gorolling_rollbacks_total"),
		version:   version,
	}
	// Both kinds and outcomes exist from the start, at zero, so that a
	// rate over them is defined before the first upgrade.
	for _, kind := range []string{"workers", "master"} {
		for _, out := range []string{outcomeOK, outcomeRolledBack} {
			m.upgrades[[2]string{kind, out}] = set.NewCounter(fmt.Sprintf(`gorolling_upgrades_total{kind=%q,outcome=%q}`, kind, out))
		}
	}
	return m
}

// UpgradeFinished counts one finished upgrade (the control socket's
// account of it): by kind and outcome, its duration, and for a rollback
// the reason.
func (m *Metrics) UpgradeFinished(o control.UpgradeOutcome) {
	out := outcomeOK
	if !o.OK {
		out = outcomeRolledBack
	}
	kind := o.Kind
	if kind != "master" {
		kind = "workers"
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.upgrades[[2]string{kind, out}].Inc()
	m.dur.Update(float64(o.DurationMS) / 1000)
	if !o.OK {
		m.rollbacks.Inc()
		m.lastReason, m.lastRollAt = o.Error, time.Now()
	}
}

// Handler serves /metrics.
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		m.Write(w)
	})
	return mux
}

// Write writes every metric in the Prometheus text format.
func (m *Metrics) Write(w io.Writer) {
	st := m.status()
	var b strings.Builder
	m.mu.Lock()
	m.set.WritePrometheus(&b)
	reason, at := m.lastReason, m.lastRollAt
	m.mu.Unlock()

	g := func(name, help, typ string, v float64, labels ...string) {
		writeSample(&b, name, help, typ, v, labels...)
	}
	g("gorolling_build_info", "The gorolling version of this master.", "gauge", 1, "version", m.version)
	g("gorolling_master_pid", "The pid of the master that answered.", "gauge", float64(st.PID))
	g("gorolling_master_start_time_seconds", "When this master process started, in Unix time.", "gauge", float64(st.Started.UnixNano())/1e9)
	g("gorolling_serving_generation", "The generation that serves; 0 while none does.", "gauge", float64(st.Generation))
	g("gorolling_workers_desired", "Workers per generation (--workers, scale, TTIN, TTOU).", "gauge", float64(st.Workers))
	inProgress := 0.0
	if st.Upgrade != "" {
		inProgress = 1
	}
	g("gorolling_upgrade_in_progress", "1 while an upgrade runs.", "gauge", inProgress)

	states := map[string]int{"starting": 0, "ready": 0, "draining": 0}
	restarts := map[int]int{}
	for _, p := range st.Processes {
		states[p.State]++
		if p.Generation == st.Generation {
			restarts[p.Slot] = p.Restarts
		}
	}
	for i, s := range sortedKeys(states) {
		help, typ := "", ""
		if i == 0 {
			help, typ = "Live workers of every generation, by state.", "gauge"
		}
		g("gorolling_workers", help, typ, float64(states[s]), "state", s)
	}
	slots := make([]int, 0, len(restarts))
	for s := range restarts {
		slots = append(slots, s)
	}
	sort.Ints(slots)
	for i, s := range slots {
		help, typ := "", ""
		if i == 0 {
			help, typ = "Respawns of each slot of the serving generation (it starts again at 0 with every generation).", "counter"
		}
		g("gorolling_slot_restarts_total", help, typ, float64(restarts[s]), "slot", strconv.Itoa(s))
	}
	kinds := map[string]int{"shared": 0, "pre-opened": 0, "inherited": 0}
	for _, l := range st.Listeners {
		kinds[l.Kind]++
	}
	for i, k := range sortedKeys(kinds) {
		help, typ := "", ""
		if i == 0 {
			help, typ = "Sockets the master holds, by kind: shared (opened on workers' requests), pre-opened (--listen), inherited.", "gauge"
		}
		g("gorolling_sockets", help, typ, float64(kinds[k]), "kind", k)
	}
	g("gorolling_connections_handed_over_total", "Connections this master moved from a draining worker to a worker of the serving generation.", "counter", float64(st.ConnsHandedOver))
	g("gorolling_connections_returned_total", "Connections a draining worker offered that no worker took in time; their sender finished them itself.", "counter", float64(st.ConnsReturned))
	g("gorolling_master_upgrades_total", "Master self-upgrades of this service since its first master started.", "counter", float64(st.MasterUpgrades))
	g("gorolling_master_restarts_total", "Masters of this service that died and whose sockets a new master took back from systemd's fd store.", "counter", float64(st.MasterRestarts))
	if fds, err := procfs.OpenFDs(os.Getpid()); err == nil {
		g("gorolling_master_open_fds", "Open file descriptors of the master.", "gauge", float64(fds))
	}
	if rss, err := procfs.ResidentBytes(os.Getpid()); err == nil {
		g("gorolling_master_resident_memory_bytes", "Resident memory of the master.", "gauge", float64(rss))
	}
	if !at.IsZero() {
		g("gorolling_last_rollback_info", "The reason of the last rolled-back upgrade of this master.", "gauge", 1, "reason", control.Printable(reason, 512))
		g("gorolling_last_rollback_timestamp_seconds", "When the last rolled-back upgrade of this master finished, in Unix time.", "gauge", float64(at.UnixNano())/1e9)
	}
	io.WriteString(w, withHelp(b.String()))
}

// help of the metrics the set writes (it writes TYPE lines only).
var setHelp = map[string]string{
	"gorolling_upgrades_total":           "Finished upgrades of this master, by kind (workers, master) and outcome (ok, rolled_back).",
	"gorolling_upgrade_duration_seconds": "Upgrades of this master from the request until the old generation was gone (or the new one stopped, on rollback).",
	"gorolling_rollbacks_total":          "Upgrades of this master that were rolled back.",
}

// withHelp gives the metrics the set wrote their help text: the set
// writes an empty HELP line, which linters (promtool check metrics) flag.
func withHelp(text string) string {
	var out strings.Builder
	for _, line := range strings.SplitAfter(text, "\n") {
		if rest, ok := strings.CutPrefix(line, "# HELP "); ok {
			name, _, _ := strings.Cut(strings.TrimSpace(rest), " ")
			if h := setHelp[name]; h != "" {
				fmt.Fprintf(&out, "# HELP %s %s\n", name, h)
				continue
			}
		}
		out.WriteString(line)
	}
	return out.String()
}

func init() {
	// HELP and TYPE lines for the set's metrics (withHelp fills the HELP).
	vm.ExposeMetadata(true)
}

// writeSample writes one sample, preceded by HELP and TYPE if help is set.
// Label values are escaped as the text format wants.
func writeSample(b *strings.Builder, name, help, typ string, v float64, labels ...string) {
	if help != "" {
		fmt.Fprintf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
	}
	b.WriteString(name)
	if len(labels) > 0 {
		b.WriteByte('{')
		for i := 0; i+1 < len(labels); i += 2 {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(b, "%s=\"%s\"", labels[i], escapeLabel(labels[i+1]))
		}
		b.WriteByte('}')
	}
	fmt.Fprintf(b, " %s\n", strconv.FormatFloat(v, 'g', -1, 64))
}

func escapeLabel(s string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`).Replace(s)
}

func sortedKeys(m map[string]int) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
