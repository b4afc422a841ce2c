package main

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
)

// roff escapes text for a man page line.
func roff(s string) string {
	s = strings.ReplaceAll(s, `\`, `\e`)
	s = strings.ReplaceAll(s, "-", `\-`)
	if strings.HasPrefix(s, ".") || strings.HasPrefix(s, "'") {
		s = `\&` + s
	}
	return s
}

// paragraphs renders blank-line separated text as roff paragraphs.
func paragraphs(w io.Writer, text string) {
	for i, p := range strings.Split(text, "\n\n") {
		if i > 0 {
			fmt.Fprintln(w, ".PP")
		}
		if lines := strings.Split(p, "\n"); indented(lines) {
			// An indented block (commands to type) keeps its lines.
			fmt.Fprintln(w, ".nf")
			for _, l := range lines {
				fmt.Fprintln(w, roff(strings.TrimPrefix(l, "  ")))
			}
			fmt.Fprintln(w, ".fi")
			continue
		}
		fmt.Fprintln(w, roff(strings.Join(strings.Fields(p), " ")))
	}
}

// indented reports whether every line starts with two spaces.
func indented(lines []string) bool {
	for _, l := range lines {
		if !strings.HasPrefix(l, "  ") {
			return false
		}
	}
	return len(lines) > 0
}

// writeMan writes gorolling(1) in roff, from the same command table and
// flag definitions the binary parses with.
func writeMan(w io.Writer) {
	// SOURCE_DATE_EPOCH keeps package builds reproducible.
	when := time.Now()
	if sec, err := strconv.ParseInt(os.Getenv("SOURCE_DATE_EPOCH"), 10, 64); err == nil {
		when = time.Unix(sec, 0)
	}
	date := when.UTC().Format("January 2006")
	fmt.Fprintf(w, ".TH GOROLLING 1 %q %q \"User Commands\"\n", date, "gorolling "+Version())
	fmt.Fprintln(w, ".SH NAME")
	fmt.Fprintln(w, `gorolling \- run a service as workers sharing sockets, and upgrade it without dropping a request`)
	fmt.Fprintln(w, ".SH SYNOPSIS")
	for _, c := range commands {
		fmt.Fprintf(w, ".B gorolling %s\n", c.name)
		if c.args != "" {
			fmt.Fprintf(w, ".I %s\n", roff(c.args))
		}
		fmt.Fprintln(w, ".br")
	}
	fmt.Fprintln(w, ".SH DESCRIPTION")
	paragraphs(w, `gorolling starts a long-lived master that runs N worker processes of a program. Workers ask the master for listening sockets, the way Node.js's cluster module works: the master opens each socket once and hands a duplicate of its descriptor to every worker, so all workers accept on the same port. On SIGHUP the master starts a new generation of workers from the binary now on disk, waits until they are ready, then drains and retires the old generation. The sockets never close, so no connection is refused.

Go programs use the package github.com/gorolling/gorolling/worker. Programs in other languages receive pre-opened sockets through the systemd socket-activation protocol, or speak the handoff protocol documented in handoff/PROTOCOL.md.`)
	fmt.Fprintln(w, ".SH COMMANDS")
	for _, c := range commands {
		fmt.Fprintf(w, ".TP\n.B %s\n", c.name)
		fmt.Fprintln(w, roff(c.summary))
		if c.long != "" {
			fmt.Fprintln(w, ".PP")
			paragraphs(w, c.long)
		}
	}
	for _, c := range commands {
		if c.flags == nil {
			continue
		}
		fmt.Fprintf(w, ".SH OPTIONS FOR %s\n", strings.ToUpper(c.name))
		c.flags().VisitAll(func(f *pflag.Flag) {
			if f.Hidden {
				return
			}
			name := `\-\-` + roff(f.Name)
			if f.Shorthand != "" {
				name = `\-` + f.Shorthand + ", " + name
			}
			arg := ""
			if f.Value.Type() != "bool" {
				arg = " " + strings.ToUpper(f.Value.Type())
			}
			fmt.Fprintf(w, ".TP\n.B %s%s\n", name, roff(arg))
			u := f.Usage
			if f.DefValue != "" && f.DefValue != "[]" && f.DefValue != "false" {
				u += " (default " + f.DefValue + ")"
			}
			fmt.Fprintln(w, roff(u))
		})
	}
	fmt.Fprintln(w, ".SH SIGNALS")
	for _, s := range signalHelp {
		fmt.Fprintf(w, ".TP\n.B %s\n%s\n", s[0], roff(s[1]))
	}
	fmt.Fprintln(w, ".SH ENVIRONMENT")
	paragraphs(w, `Every worker gets GOROLLING_FD (its handoff channel), GOROLLING_SLOT (0..N-1, reused by the slot's replacement and by the next generation), GOROLLING_WORKER_ID (unique, never reused) and GOROLLING_GENERATION (1, 2, ...). The master's own LISTEN_*, NOTIFY_SOCKET, FDSTORE, WATCHDOG_* and GOROLLING_* variables are not passed on.`)
	fmt.Fprintln(w, ".SH FILES")
	fmt.Fprintln(w, ".TP\n.B /run/gorolling/NAME.sock\nthe control socket of the master of service NAME (as root; else under $XDG_RUNTIME_DIR/gorolling, or /tmp/gorolling-UID without $XDG_RUNTIME_DIR), beside NAME.sock.lock, which keeps a second master of the same name out and stays after a stop")
	fmt.Fprintln(w, ".TP\n.B /etc/gorolling/NAME.conf\nOPTIONS and COMMAND of the systemd unit gorolling@NAME.service (packaged installs)")
	fmt.Fprintln(w, ".SH EXIT STATUS")
	paragraphs(w, `exec: 0 after a clean stop; 1 when the master cannot start (the first generation cannot start, a --listen socket or the --chdir directory cannot be used, the control socket is in use or its directory is not private); 2 for bad usage. upgrade --wait: 0 once the new generation (or master) serves, 1 if the upgrade was rolled back, 3 if --timeout passed while it goes on. The other commands: 0 on success, 1 on failure, 2 for bad usage.`)
	fmt.Fprintln(w, ".SH SEE ALSO")
	fmt.Fprintln(w, `.BR systemd.socket (5),`)
	fmt.Fprintln(w, `.BR sd_notify (3)`)
}
