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

	"github.com/gorolling/gorolling/master"
)

// version is stamped at build time: -ldflags "-X main.version=1.2.3".
var version = ""

// inherited are the sockets this process inherited, scanned before
// anything else opens a descriptor.
var inherited = master.ScanInherited()

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	switch args[0] {
	case "exec":
		return runExec(args[1:], stdout, stderr)
	case "version", "--version", "-v":
		fmt.Fprintf(stdout, "gorolling %s\n", Version())
		return 0
	case "help", "--help", "-h":
		if len(args) > 1 && args[1] == "exec" {
			fs, _ := execFlags()
			execUsage(stdout, fs)
			return 0
		}
		usage(stdout)
		return 0
	default:
		fmt.Fprintf(stderr, "gorolling: unknown command %q\n\n", args[0])
		usage(stderr)
		return 2
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

func usage(w io.Writer) {
	fmt.Fprint(w, `gorolling runs a program as N worker processes that share listening sockets,
and on SIGHUP replaces them with a new generation without dropping a request.

Usage:
  gorolling exec [flags] [--] PROGRAM [ARGS...]   run PROGRAM under a master
  gorolling version                               print the version
  gorolling help [exec]                           print this help, or exec's flags

Signals to the master:
  HUP        start a new generation from the program on disk, drain the old one
  TERM, INT  drain every worker and exit 0; a second one kills the workers

Workers in Go use github.com/gorolling/gorolling/worker; see the README.
`)
}
