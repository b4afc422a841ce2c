package metrics

import (
	"strings"
	"testing"
	"time"

	"github.com/gorolling/gorolling/master/control"
)

// TestExposition: every metric has one HELP and one TYPE line before its
// samples, counters move on finished upgrades, and a rollback's reason is
// escaped into a valid label value.
func TestExposition(t *testing.T) {
	st := control.Status{PID: 42, Started: time.Now(), Generation: 3, Workers: 2,
		Processes: []control.WorkerStatus{{Generation: 3, Slot: 0, State: "ready"}, {Generation: 3, Slot: 1, State: "ready", Restarts: 2}, {Generation: 2, Slot: 0, State: "draining"}},
		Listeners: []control.ListenerStatus{{Kind: "shared"}, {Kind: "pre-opened"}}}
	m := New(func() control.Status { return st }, "1.2.3")
	m.UpgradeFinished(control.UpgradeOutcome{Kind: "workers", OK: true, DurationMS: 12})
	m.UpgradeFinished(control.UpgradeOutcome{Kind: "workers", OK: false, DurationMS: 30, Error: "worker \"x\" exited\nstatus 1 \\ bad"})
	var b strings.Builder
	m.Write(&b)
	text := b.String()
	help, typ := map[string]int{}, map[string]int{}
	samples := map[string]string{}
	for _, line := range strings.Split(text, "\n") {
		switch {
		case strings.HasPrefix(line, "# HELP "):
			f := strings.Fields(line)
			if len(f) < 4 {
				t.Errorf("HELP without text: %q", line)
			}
			help[f[2]]++
		case strings.HasPrefix(line, "# TYPE "):
			typ[strings.Fields(line)[2]]++
		case line != "":
			i := strings.LastIndexByte(line, ' ')
			samples[line[:i]] = line[i+1:]
		}
	}
	for name, n := range typ {
		if n != 1 || help[name] != 1 {
			t.Errorf("%s: %d TYPE and %d HELP lines, want one each", name, n, help[name])
		}
	}
	for series, want := range map[string]string{
		`gorolling_upgrades_total{kind="workers",outcome="ok"}`:                     "1",
		`gorolling_upgrades_total{kind="workers",outcome="rolled_back"}`:            "1",
		`gorolling_upgrades_total{kind="master",outcome="ok"}`:                      "0",
		"gorolling_rollbacks_total":                                                 "1",
		"gorolling_upgrade_duration_seconds_count":                                  "2",
		"gorolling_serving_generation":                                              "3",
		`gorolling_workers{state="ready"}`:                                          "2",
		`gorolling_workers{state="draining"}`:                                       "1",
		`gorolling_workers{state="starting"}`:                                       "0",
		`gorolling_slot_restarts_total{slot="1"}`:                                   "2",
		`gorolling_sockets{kind="pre-opened"}`:                                      "1",
		`gorolling_build_info{version="1.2.3"}`:                                     "1",
		`gorolling_last_rollback_info{reason="worker \"x\" exitedstatus 1 \\ bad"}`: "1",
	} {
		if got := samples[series]; got != want {
			t.Errorf("%s = %q, want %s", series, got, want)
		}
	}
}
