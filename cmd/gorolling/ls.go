package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/gorolling/gorolling/master/control"
	"github.com/spf13/pflag"
)

const lsLong = `Asks every master whose control socket is in this user's control directories
(/run/gorolling for root; $XDG_RUNTIME_DIR/gorolling and the /tmp/gorolling-UID
fallback for other users, each only if it is the user's own with mode 0700),
or in the directories given with --dir, and prints
one line for each: its name, pid, version, uptime, serving generation, ready
and total workers, and the upgrade in progress. A socket nobody listens on any
more (a master that was killed) is left out; a master that does not answer is
listed with the error, and a socket served by another user is left out.
Masters started with --control elsewhere are found only with --dir.`

// lsEntry is one master as ls prints it (--json prints these fields).
type lsEntry struct {
	Name       string  `json:"name"`
	Control    string  `json:"control"`
	PID        int     `json:"pid,omitempty"`
	Version    string  `json:"version,omitempty"`
	UptimeSec  float64 `json:"uptime_seconds,omitempty"`
	Generation int     `json:"generation"`
	Ready      int     `json:"workers_ready"`
	Workers    int     `json:"workers"`
	Upgrade    string  `json:"upgrade"`
	Error      string  `json:"error,omitempty"`
}

func lsFlags() (*pflag.FlagSet, *[]string, *bool) {
	fs := pflag.NewFlagSet("ls", pflag.ContinueOnError)
	dirs := fs.StringArray("dir", nil, "look in this directory instead of the default ones (repeatable)")
	asJSON := fs.Bool("json", false, "print a JSON array")
	return fs, dirs, asJSON
}

func runLs(args []string, stdout, stderr io.Writer) int {
	fs, dirs, asJSON := lsFlags()
	if code := parseClient(fs, args, findCommand("ls"), stdout, stderr); code >= 0 {
		return code
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "gorolling ls: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	search := *dirs
	if len(search) == 0 {
		// A default directory someone else made (the /tmp fallback can be
		// created by anyone first) is not ours to list.
		for _, d := range control.SearchDirs() {
			if control.PrivateDir(d) {
				search = append(search, d)
			}
		}
	}
	var paths []string
	for _, d := range search {
		paths = append(paths, control.Sockets(d)...)
	}
	// Ask them all at once: one master that hangs must not make the list
	// wait for each of the others.
	entries := make([]*lsEntry, len(paths))
	var wg sync.WaitGroup
	for i, p := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			entries[i] = lsQuery(p)
		}()
	}
	wg.Wait()
	out := []*lsEntry{}
	for _, e := range entries {
		if e != nil {
			out = append(out, e)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(out)
		return 0
	}
	if len(out) == 0 {
		fmt.Fprintf(stderr, "gorolling ls: no master runs (looked in %s)\n", strings.Join(search, ", "))
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tPID\tVERSION\tUPTIME\tGEN\tREADY\tUPGRADE")
	for _, e := range out {
		name := control.Printable(e.Name, 256)
		if e.Error != "" {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\tnot answering: %s\n", name, control.Printable(e.Error, 512))
			continue
		}
		gen := "-"
		if e.Generation > 0 {
			gen = fmt.Sprint(e.Generation)
		}
		up := e.Upgrade
		if up == "" {
			up = "none"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%d/%d\t%s\n", name, e.PID, control.Printable(e.Version, 64), dur(e.UptimeSec), gen, e.Ready, e.Workers, control.Printable(up, 256))
	}
	tw.Flush()
	return 0
}

// lsQuery asks the master at path for its status; nil for a stale socket.
func lsQuery(path string) *lsEntry {
	e := &lsEntry{Name: strings.TrimSuffix(filepath.Base(path), ".sock"), Control: path}
	resp, err := control.Call(path, control.Request{Cmd: "status"}, 3*time.Second)
	if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
		return nil // nobody listens: a master that died, or one that just exited
	}
	if errors.Is(err, control.ErrForeign) {
		return nil // another user's socket: not a master of ours, whatever its name
	}
	if err == nil && !resp.OK {
		err = errors.New(resp.Error)
	}
	if err == nil && resp.Status == nil {
		err = errors.New("the answer has no status")
	}
	if err != nil {
		e.Error = err.Error()
		return e
	}
	st := resp.Status
	e.PID, e.Version, e.UptimeSec = st.PID, st.Version, st.UptimeSec
	e.Generation, e.Workers, e.Upgrade = st.Generation, st.Workers, st.Upgrade
	for _, p := range st.Processes {
		if p.Generation == st.Generation && p.State == "ready" {
			e.Ready++
		}
	}
	return e
}
