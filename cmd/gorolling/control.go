package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/gorolling/gorolling/master/control"
	"github.com/gorolling/gorolling/master/procfs"
	"github.com/spf13/pflag"
)

// clientFlags are the flags every control command takes.
type clientFlags struct {
	name    string
	control string
}

func (c *clientFlags) add(fs *pflag.FlagSet) {
	fs.StringVar(&c.name, "name", "", "the service's name, as given to (or defaulted by) gorolling exec --name")
	fs.StringVar(&c.control, "control", "", "the control socket's path (overrides --name)")
}

// socket finds the master's control socket: --control, --name, or the
// only socket in the default directory.
func (c *clientFlags) socket() (string, error) {
	return control.Find(c.control, c.name)
}

// parseClient parses a control command's flags; it returns a non-negative
// exit code when the command should end at once.
func parseClient(fs *pflag.FlagSet, args []string, c *command, stdout, stderr io.Writer) int {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			commandUsage(stdout, c)
			return 0
		}
		fmt.Fprintf(stderr, "gorolling %s: %v\nRun 'gorolling help %s' for usage.\n", c.name, err, c.name)
		return 2
	}
	return -1
}

func statusFlags() (*pflag.FlagSet, *clientFlags, *bool) {
	fs := pflag.NewFlagSet("status", pflag.ContinueOnError)
	cf := &clientFlags{}
	cf.add(fs)
	asJSON := fs.Bool("json", false, "print the status as JSON")
	return fs, cf, asJSON
}

func runStatus(args []string, stdout, stderr io.Writer) int {
	fs, cf, asJSON := statusFlags()
	if code := parseClient(fs, args, findCommand("status"), stdout, stderr); code >= 0 {
		return code
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "gorolling status: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	path, err := cf.socket()
	if err != nil {
		fmt.Fprintf(stderr, "gorolling status: %v\n", err)
		return 1
	}
	resp, err := control.Call(path, control.Request{Cmd: "status"}, 10*time.Second)
	if err == nil && !resp.OK {
		err = errors.New(resp.Error)
	}
	if err != nil {
		fmt.Fprintf(stderr, "gorolling status: %v\n", err)
		return 1
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(resp.Status)
		return 0
	}
	printStatus(stdout, resp.Status)
	return 0
}

func dur(sec float64) string {
	d := time.Duration(sec * float64(time.Second))
	switch {
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	case d < time.Hour:
		return d.Round(time.Second).String()
	}
	return d.Round(time.Minute).String()
}

func printStatus(w io.Writer, st *control.Status) {
	fmt.Fprintf(w, "master     pid %d, up %s, version %s\n", st.PID, dur(st.UptimeSec), st.Version)
	fmt.Fprintf(w, "program    %s\n", st.Program)
	serving := "none"
	if st.Generation > 0 {
		serving = fmt.Sprintf("generation %d, %d workers", st.Generation, st.Workers)
	}
	fmt.Fprintf(w, "serving    %s\n", serving)
	up := st.Upgrade
	if up == "" {
		up = "none in progress"
	}
	fmt.Fprintf(w, "upgrade    %s\n", up)
	if f := st.MasterUpgradeFailure; f != nil {
		fmt.Fprintf(w, "master     upgrade failed %s ago: %s (automatic upgrades try it again once the gorolling binary changes)\n", dur(time.Since(f.At).Seconds()), control.Printable(f.Error, 1024))
	}
	if st.MasterUpgrades > 0 || st.MasterRestarts > 0 {
		fmt.Fprintf(w, "service    up since %s, %d master upgrades, %d master restarts\n", st.ServiceStarted.Format(time.RFC3339), st.MasterUpgrades, st.MasterRestarts)
	}
	if st.FDStore >= 0 {
		fmt.Fprintf(w, "fd store   %d sockets kept by systemd for a restart\n", st.FDStore)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "GEN\tSLOT\tID\tPID\tSTATE\tUPTIME\tRESTARTS\tSTATUS")
	for _, p := range st.Processes {
		gen := strconv.Itoa(p.Generation)
		if p.GenState != "serving" {
			gen += " (" + p.GenState + ")"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s\t%s\t%d\t%s\n", gen, p.Slot, p.ID, p.PID, p.State, dur(p.UptimeSec), p.Restarts, control.Printable(p.Status, 256))
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LISTENER\tADDRESS\tKIND\tNAME\tGENERATIONS")
	ls := append([]control.ListenerStatus(nil), st.Listeners...)
	sort.Slice(ls, func(i, j int) bool { return ls[i].Key < ls[j].Key })
	for _, l := range ls {
		var gens []string
		for _, g := range l.Generations {
			gens = append(gens, strconv.Itoa(g))
		}
		g := strings.Join(gens, ",")
		if g == "" {
			g = "-"
		}
		// Unix socket paths are chosen by workers: print them inert.
		fmt.Fprintf(tw, "%s\t%s %s\t%s\t%s\t%s\n", control.Printable(l.Key, 4096), l.Network, control.Printable(l.Address, 4096), l.Kind, control.Printable(l.Name, 256), g)
	}
	tw.Flush()
}

type upgradeOpts struct {
	clientFlags
	wait    bool
	timeout time.Duration
	master  bool
	workers bool
}

func upgradeFlags() (*pflag.FlagSet, *upgradeOpts) {
	o := &upgradeOpts{}
	fs := pflag.NewFlagSet("upgrade", pflag.ContinueOnError)
	o.add(fs)
	fs.BoolVar(&o.wait, "wait", false, "wait until the upgrade has finished; exit 0 only if the new generation (or master) took over")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Minute, "with --wait, give up waiting after this long (the upgrade goes on)")
	fs.BoolVar(&o.master, "master", false, "re-exec the master from the gorolling binary on disk, like SIGUSR2")
	fs.BoolVar(&o.workers, "workers", false, "only start a new generation of workers, even if the gorolling binary changed")
	return fs, o
}

func runUpgrade(args []string, stdout, stderr io.Writer) int {
	fs, o := upgradeFlags()
	if code := parseClient(fs, args, findCommand("upgrade"), stdout, stderr); code >= 0 {
		return code
	}
	if o.master && o.workers {
		fmt.Fprintln(stderr, "gorolling upgrade: --master and --workers exclude each other")
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "gorolling upgrade: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	path, err := o.socket()
	if err != nil {
		fmt.Fprintf(stderr, "gorolling upgrade: %v\n", err)
		return 1
	}
	req := control.Request{Cmd: "upgrade", Wait: o.wait, TimeoutMS: o.timeout.Milliseconds(), Kind: "auto"}
	if o.master {
		req.Kind = "master"
	} else if o.workers {
		req.Kind = "workers"
	}
	resp, err := control.Call(path, req, o.timeout+10*time.Second)
	if err != nil {
		fmt.Fprintf(stderr, "gorolling upgrade: %v\n", err)
		return 1
	}
	if resp.InProgress {
		// Not a rollback: the new generation may still take over. A
		// deploy script must not undo the release on this code.
		fmt.Fprintf(stderr, "gorolling upgrade: %s (see gorolling status)\n", resp.Error)
		return 3
	}
	if !resp.OK {
		fmt.Fprintf(stderr, "gorolling upgrade: failed: %s\n", resp.Error)
		return 1
	}
	if !o.wait {
		fmt.Fprintln(stdout, "upgrade started")
		return 0
	}
	u := resp.Upgrade
	if u.MasterError != "" {
		fmt.Fprintf(stderr, "gorolling upgrade: warning: the master upgrade failed, so only the workers were upgraded: %s\n", u.MasterError)
	}
	if u.Kind == "master" {
		fmt.Fprintf(stdout, "master upgraded: new master pid %d serves generation %d (%d ms)\n", u.NewPID, u.To, u.DurationMS)
	} else {
		fmt.Fprintf(stdout, "upgraded: generation %d replaced generation %d (%d ms)\n", u.To, u.From, u.DurationMS)
	}
	return 0
}

func scaleFlags() (*pflag.FlagSet, *clientFlags) {
	fs := pflag.NewFlagSet("scale", pflag.ContinueOnError)
	cf := &clientFlags{}
	cf.add(fs)
	return fs, cf
}

func runScale(args []string, stdout, stderr io.Writer) int {
	fs, cf := scaleFlags()
	if code := parseClient(fs, args, findCommand("scale"), stdout, stderr); code >= 0 {
		return code
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(stderr, "gorolling scale: want one argument: the number of workers, or +N / -N")
		return 2
	}
	arg := fs.Arg(0)
	req := control.Request{Cmd: "scale"}
	n, err := strconv.Atoi(arg)
	if err != nil {
		fmt.Fprintf(stderr, "gorolling scale: %q is not a number\n", arg)
		return 2
	}
	if strings.HasPrefix(arg, "+") || strings.HasPrefix(arg, "-") {
		req.Delta = n
	} else {
		req.Workers = n
	}
	if req.Delta == 0 && req.Workers < 1 {
		fmt.Fprintln(stderr, "gorolling scale: want at least 1 worker")
		return 2
	}
	path, err := cf.socket()
	if err != nil {
		fmt.Fprintf(stderr, "gorolling scale: %v\n", err)
		return 1
	}
	resp, err := control.Call(path, req, 30*time.Second)
	if err == nil && !resp.OK {
		err = errors.New(resp.Error)
	}
	if err != nil {
		fmt.Fprintf(stderr, "gorolling scale: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "scaled to %d workers\n", resp.Workers)
	return 0
}

type stopOpts struct {
	clientFlags
	timeout time.Duration
}

func stopFlags() (*pflag.FlagSet, *stopOpts) {
	o := &stopOpts{}
	fs := pflag.NewFlagSet("stop", pflag.ContinueOnError)
	o.add(fs)
	fs.DurationVar(&o.timeout, "timeout", 2*time.Minute, "wait this long for the master to exit")
	return fs, o
}

func runStop(args []string, stdout, stderr io.Writer) int {
	fs, o := stopFlags()
	if code := parseClient(fs, args, findCommand("stop"), stdout, stderr); code >= 0 {
		return code
	}
	path, err := o.socket()
	if err != nil {
		fmt.Fprintf(stderr, "gorolling stop: %v\n", err)
		return 1
	}
	st, err := control.Call(path, control.Request{Cmd: "status"}, 10*time.Second)
	if err != nil {
		fmt.Fprintf(stderr, "gorolling stop: %v\n", err)
		return 1
	}
	resp, err := control.Call(path, control.Request{Cmd: "stop"}, 10*time.Second)
	if err == nil && !resp.OK {
		err = errors.New(resp.Error)
	}
	if err != nil {
		fmt.Fprintf(stderr, "gorolling stop: %v\n", err)
		return 1
	}
	// Wait for the master process to go.
	pid := st.Status.PID
	deadline := time.Now().Add(o.timeout)
	for procfs.Running(pid) {
		if time.Now().After(deadline) {
			fmt.Fprintf(stderr, "gorolling stop: master %d still running after %s\n", pid, o.timeout)
			return 1
		}
		time.Sleep(50 * time.Millisecond)
	}
	fmt.Fprintf(stdout, "stopped master %d\n", pid)
	return 0
}
