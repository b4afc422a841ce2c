// Command gorolling runs a program as a set of worker processes that share
// listening sockets, and replaces them with a new generation on SIGHUP
// without refusing or dropping a connection.
//
//	gorolling exec [flags] [--] PROGRAM [ARGS...]
//	gorolling version
//
// Run "gorolling help" for the full usage.
package main

import (
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"

	"github.com/spf13/pflag"
)

// version is stamped at build time: -ldflags "-X main.version=1.2.3".
var version = ""

func main() {
	if len(os.Args) > 1 && os.Args[1] == shimCommand {
		// Before anything marks the inherited descriptors close-on-exec.
		os.Exit(runShim(os.Args[2:]))
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// command is one subcommand. Usage, "help CMD" and the man page are all
// rendered from this table and the commands' own flag sets.
type command struct {
	name    string
	args    string // synopsis after the name
	summary string // one line
	long    string // paragraphs for help and the man page
	flags   func() *pflag.FlagSet
	run     func(args []string, stdout, stderr io.Writer) int
}

var commands []*command

func init() {
	commands = []*command{
		{
			name: "exec", args: "[flags] [--] PROGRAM [ARGS...]",
			summary: "run PROGRAM as N workers under a master",
			long:    execLong,
			flags:   func() *pflag.FlagSet { fs, _ := execFlags(); return fs },
			run:     runExec,
		},
		{
			name: "status", args: "[--name NAME | --control PATH] [--json]",
			summary: "show the master, its workers and its listeners",
			long:    "Asks the running master over its control socket. --json prints the same data for machines.",
			flags:   func() *pflag.FlagSet { fs, _, _ := statusFlags(); return fs },
			run:     runStatus,
		},
		{
			name: "ls", args: "[--json] [--dir DIR]...",
			summary: "list the running masters: name, pid, version, uptime, generation, workers, upgrade",
			long:    lsLong,
			flags:   func() *pflag.FlagSet { fs, _, _ := lsFlags(); return fs },
			run:     runLs,
		},
		{
			name: "upgrade", args: "[--wait] [--timeout D] [--master | --workers] [--name NAME | --control PATH]",
			summary: "start the same upgrade as SIGHUP (or SIGUSR2 with --master)",
			long:    upgradeLong,
			flags:   func() *pflag.FlagSet { fs, _ := upgradeFlags(); return fs },
			run:     runUpgrade,
		},
		{
			name: "scale", args: "N|+N|-N [--name NAME | --control PATH]",
			summary: "set the number of workers (SIGTTIN and SIGTTOU add and remove one)",
			flags:   func() *pflag.FlagSet { fs, _ := scaleFlags(); return fs },
			run:     runScale,
		},
		{
			name: "stop", args: "[--timeout D] [--name NAME | --control PATH]",
			summary: "drain every worker and stop the master, like SIGTERM; waits for it to exit",
			flags:   func() *pflag.FlagSet { fs, _ := stopFlags(); return fs },
			run:     runStop,
		},
		{
			name: "version", summary: "print the version",
			run: func(_ []string, stdout, _ io.Writer) int {
				fmt.Fprintf(stdout, "gorolling %s\n", Version())
				return 0
			},
		},
		{
			name: "completion", args: "bash|zsh",
			summary: "print a shell completion script",
			long:    completionLong,
			run:     runCompletion,
		},
		{
			name: "man", summary: "print the gorolling(1) manual page (roff)",
			run: func(_ []string, stdout, _ io.Writer) int {
				writeMan(stdout)
				return 0
			},
		},
		{
			name: "help", args: "[COMMAND]", summary: "print this help, or a command's",
			run: runHelp,
		},
	}
}

func findCommand(name string) *command {
	for _, c := range commands {
		if c.name == name {
			return c
		}
	}
	return nil
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	switch args[0] {
	case "--version", "-v":
		args[0] = "version"
	case "--help", "-h":
		args[0] = "help"
	}
	c := findCommand(args[0])
	if c == nil {
		fmt.Fprintf(stderr, "gorolling: unknown command %q\n\n", args[0])
		usage(stderr)
		return 2
	}
	return c.run(args[1:], stdout, stderr)
}

func runHelp(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stdout)
		return 0
	}
	c := findCommand(args[0])
	if c == nil {
		fmt.Fprintf(stderr, "gorolling: unknown command %q\n", args[0])
		return 2
	}
	commandUsage(stdout, c)
	return 0
}

// commandUsage prints one command's help.
func commandUsage(w io.Writer, c *command) {
	fmt.Fprintf(w, "Usage: gorolling %s %s\n\n%s\n", c.name, c.args, c.summary)
	if c.long != "" {
		fmt.Fprintf(w, "\n%s\n", c.long)
	}
	if c.flags != nil {
		fmt.Fprintf(w, "\nFlags:\n%s", c.flags().FlagUsages())
	}
}

// Version returns the stamped version, or the module version, or "dev".
func Version() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

// signalHelp documents the master's signals (usage and man page).
var signalHelp = [][2]string{
	{"HUP", "upgrade: re-exec the master if the gorolling binary changed on disk, else start a new generation of workers from the program on disk; the old one drains once the new one is ready"},
	{"USR2", "re-exec the master from the gorolling binary on disk (it starts its own generation; this master then drains its workers and exits)"},
	{"TERM, INT", "drain every worker and exit 0; a second one kills the workers"},
	{"TTIN, TTOU", "one worker more, one worker fewer"},
}

const upgradeLong = `Asks the running master for an upgrade. By default it does what SIGHUP does:
if the gorolling binary on disk changed since the master started, the master
re-execs itself (the new master starts its own generation of workers, then the
old master drains its workers and exits); otherwise it starts a new generation
of workers from the program on disk and drains the old one.

With --wait it blocks until the upgrade has finished, and exits 0 only if the
new generation (or master) took over; otherwise it exits 1 and prints why the
upgrade was rolled back. If --timeout passes first it exits 3: the upgrade
goes on, neither taken over nor rolled back yet (see status). Deploy scripts
use: gorolling upgrade --wait --name NAME`

func usage(w io.Writer) {
	fmt.Fprint(w, "gorolling runs a program as N worker processes that share listening sockets,\nand on SIGHUP replaces them with a new generation without dropping a request.\n\nUsage:\n")
	for _, c := range commands {
		fmt.Fprintf(w, "  gorolling %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprint(w, "\nSignals to the master:\n")
	for _, s := range signalHelp {
		fmt.Fprintf(w, "  %-11s%s\n", s[0], wrap(s[1], 66, strings.Repeat(" ", 13)))
	}
	fmt.Fprint(w, "\nRun 'gorolling help COMMAND' for a command's flags. Go workers use\ngithub.com/gorolling/gorolling/worker; see the README.\n")
}

// wrap breaks text into lines of at most width characters, indenting the
// continuation lines.
func wrap(text string, width int, indent string) string {
	var b strings.Builder
	n := 0
	for i, word := range strings.Fields(text) {
		if i > 0 && n+1+len(word) > width {
			b.WriteString("\n" + indent)
			n = 0
		} else if i > 0 {
			b.WriteByte(' ')
			n++
		}
		b.WriteString(word)
		n += len(word)
	}
	return b.String()
}
