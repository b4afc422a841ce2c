// Command packaging builds the gorolling .deb and .rpm packages with nfpm,
// used as a library. Run it from the repository root:
//
//	go -C packaging run . -version 0.1.0
//
// It builds cmd/gorolling as a static binary stamped with the version,
// renders gorolling(1) with the binary's own "man" command, and writes
// gorolling_VERSION_ARCH.deb and gorolling-VERSION.ARCH.rpm (rpm's
// architecture names) to -out, printing their paths.
//
// This directory is a module of its own so that nothing importing
// github.com/gorolling/gorolling inherits nfpm's dependencies.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run parses args, builds the packages and prints their paths on stdout.
// It returns the exit status: 0 on success, 1 when the build fails and 2
// for bad usage.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	opts, err := parseFlags(args, stdout)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "packaging: %v\nRun 'go -C packaging run . -help' for usage.\n", err)
		return 2
	}
	paths, err := buildPackages(ctx, opts, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "packaging: %v\n", err)
		return 1
	}
	for _, p := range paths {
		fmt.Fprintln(stdout, p)
	}
	return 0
}
