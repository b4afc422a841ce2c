package integration

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorolling/gorolling/master/events"
)

// scrape fetches /metrics and returns the body and its samples by series
// (name and labels, as written).
func scrape(t *testing.T, addr string) (string, map[string]float64) {
	t.Helper()
	// A connection of its own each time, as Prometheus's scrapes mostly
	// are: no pooled connection hides a full server.
	c := http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("scrape: %s", resp.Status)
	}
	samples := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad sample line %q", line)
		}
		samples[line[:i]] = v
	}
	return string(b), samples
}

// TestMetrics scrapes a master's /metrics while it upgrades, rolls back and
// replaces itself: the counters move, the gauges follow, the successor
// serves the same address, and promtool finds nothing to lint.
func TestMetrics(t *testing.T) {
	promtool := requireTool(t, "promtool")
	pidFile := filepath.Join(t.TempDir(), "master.pid")
	report := filepath.Join(t.TempDir(), "report")
	p := startMaster(t, masterOpts{
		args: []string{"-w", "2", "--metrics", "127.0.0.1:0", "--pid-file", pidFile, "--ready-timeout", "5s", "--", binPath("testworker")},
		env:  []string{"TW_SCRIPT=gen5:crash; listen tcp 127.0.0.1:0", "TW_REPORT=" + report},
	})
	p.waitServing()
	e, _ := p.waitLog(10*time.Second, 0, "metrics", isEvent(events.MetricsServing))
	addr := e.str("addr")
	_, s := scrape(t, addr)
	for series, want := range map[string]float64{
		"gorolling_serving_generation":                                   1,
		`gorolling_workers{state="ready"}`:                               2,
		`gorolling_upgrades_total{kind="workers",outcome="ok"}`:          0,
		`gorolling_sockets{kind="shared"}`:                               2, // one listen, a socket per slot (--spread even)
		"gorolling_connections_handed_over_total":                        0,
		"gorolling_master_upgrades_total":                                0,
		`gorolling_upgrades_total{kind="master",outcome="ok"}`:           0,
		`gorolling_upgrade_duration_seconds_count`:                       0,
		"gorolling_rollbacks_total":                                      0,
		`gorolling_upgrades_total{kind="workers",outcome="rolled_back"}`: 0,
	} {
		if got, ok := s[series]; !ok || got != want {
			t.Errorf("before any upgrade: %s = %v (present %v), want %v", series, got, ok, want)
		}
	}
	if s["gorolling_master_open_fds"] <= 0 || s["gorolling_master_resident_memory_bytes"] <= 0 {
		t.Errorf("master fds %v, RSS %v", s["gorolling_master_open_fds"], s["gorolling_master_resident_memory_bytes"])
	}

	// 24 clients that connect and say nothing: the master serves at most
	// 16 connections at once (the rest wait in the queue), drops silent
	// ones after 5 s, and answers scrapes again then.
	fdsOf := func() int {
		ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.cmd.Process.Pid))
		return len(ents)
	}
	before := fdsOf()
	var idle []net.Conn
	for i := 0; i < 24; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	time.Sleep(300 * time.Millisecond)
	if grown := fdsOf() - before; grown > 16 {
		t.Errorf("24 silent connections cost the master %d descriptors, want at most 16", grown)
	}
	scraped := time.Now()
	scrape(t, addr)
	t.Logf("a scrape behind 24 silent connections: %s", time.Since(scraped).Round(time.Millisecond))
	for _, c := range idle {
		c.Close()
	}

	// Scrape all the time while three upgrades run: every scrape answers,
	// and one sees an upgrade in progress.
	var wg sync.WaitGroup
	stop := make(chan struct{})
	var mu sync.Mutex
	scrapes, sawUpgrade, failed := 0, false, 0
	wg.Add(1)
	go func() {
		defer wg.Done()
		c := http.Client{Timeout: 5 * time.Second}
		for {
			select {
			case <-stop:
				return
			default:
			}
			resp, err := c.Get("http://" + addr + "/metrics")
			mu.Lock()
			scrapes++
			if err != nil {
				failed++
			} else {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if bytes.Contains(b, []byte("\ngorolling_upgrade_in_progress 1\n")) {
					sawUpgrade = true
				}
			}
			mu.Unlock()
			time.Sleep(2 * time.Millisecond)
		}
	}()
	// One idle keep-alive connection to the workers: each upgrade moves it.
	wc := &http.Client{Timeout: 5 * time.Second}
	get := func() {
		resp, err := wc.Get("http://" + p.listenAddr(5*time.Second) + "/")
		if err != nil {
			t.Fatalf("request to the workers: %v", err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	get()
	for i := 0; i < 3; i++ {
		p.upgrade(60 * time.Second)
		get()
	}
	close(stop)
	wg.Wait()
	if failed > 0 || !sawUpgrade {
		t.Errorf("%d of %d scrapes during the upgrades failed; one saw an upgrade in progress: %v", failed, scrapes, sawUpgrade)
	}
	_, s = scrape(t, addr)
	for series, want := range map[string]float64{
		"gorolling_serving_generation":                          4,
		`gorolling_upgrades_total{kind="workers",outcome="ok"}`: 3,
		"gorolling_upgrade_duration_seconds_count":              3,
		`gorolling_workers{state="ready"}`:                      2,
		"gorolling_rollbacks_total":                             0,
		"gorolling_connections_handed_over_total":               3,
		"gorolling_connections_returned_total":                  0,
	} {
		if got := s[series]; got != want {
			t.Errorf("after 3 upgrades: %s = %v, want %v", series, got, want)
		}
	}
	if s["gorolling_upgrade_duration_seconds_sum"] <= 0 {
		t.Errorf("upgrade durations sum to %v", s["gorolling_upgrade_duration_seconds_sum"])
	}

	// Generation 5 crashes at start: a rollback, with its reason.
	from := len(p.entries())
	if code, _, _ := gorolling(t, nil, "upgrade", "--wait", "--control", p.controlPath()); code != 1 {
		t.Fatalf("the crashing release: upgrade --wait exit %d, want 1 (rolled back)", code)
	}
	p.waitLog(30*time.Second, from, "the rollback", isEvent(events.UpgradeRolledBack))
	body, s := scrape(t, addr)
	if s["gorolling_rollbacks_total"] != 1 || s[`gorolling_upgrades_total{kind="workers",outcome="rolled_back"}`] != 1 || s["gorolling_serving_generation"] != 4 {
		t.Errorf("after a rollback: rollbacks %v, rolled_back %v, generation %v", s["gorolling_rollbacks_total"], s[`gorolling_upgrades_total{kind="workers",outcome="rolled_back"}`], s["gorolling_serving_generation"])
	}
	if !strings.Contains(body, `gorolling_last_rollback_info{reason="`) {
		t.Error("no gorolling_last_rollback_info after a rollback")
	}
	lint(t, promtool, body)

	// A master self-upgrade: the successor answers on the same address.
	newPID := masterUpgrade(t, p, pidFile)
	_, s = scrape(t, addr)
	if int(s["gorolling_master_pid"]) != newPID || s["gorolling_master_upgrades_total"] != 1 {
		t.Errorf("after USR2: master pid %v (want %d), master upgrades %v (want 1)", s["gorolling_master_pid"], newPID, s["gorolling_master_upgrades_total"])
	}
	if s["gorolling_serving_generation"] != 6 || s[`gorolling_workers{state="ready"}`] != 2 {
		t.Errorf("after USR2: generation %v (want 6), ready %v", s["gorolling_serving_generation"], s[`gorolling_workers{state="ready"}`])
	}
	body, _ = scrape(t, addr)
	lint(t, promtool, body)
	if code, _, errOut := gorolling(t, nil, "stop", "--control", p.controlPath()); code != 0 {
		t.Fatalf("stop: exit %d: %s", code, errOut)
	}
	if alive(newPID) {
		t.Errorf("master %d still runs after stop", newPID)
	}
}

// lint runs "promtool check metrics" on a scrape.
func lint(t *testing.T, promtool, body string) {
	t.Helper()
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(body)
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s\n%s", err, out, fmt.Sprint(body))
	}
}
