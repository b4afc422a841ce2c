package main

import (
	"fmt"
	"os"
	"strconv"
	"syscall"
)

// shimCommand is the hidden subcommand a master runs between fork and the
// program when it passes pre-opened sockets. systemd's protocol wants
// LISTEN_PID to be the program's own pid, and a parent cannot know it
// before the fork (os/exec fixes the environment first): the shim sets it
// to its own pid and execs the program in place, so the program keeps that
// pid. It touches no descriptor.
const shimCommand = "_shim"

func runShim(args []string) int {
	if len(args) < 2 {
		fmt.Fprintln(os.Stderr, "gorolling _shim is internal: gorolling _shim PATH ARGV0 [ARGS...]")
		return 2
	}
	os.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
	err := syscall.Exec(args[0], args[1:], os.Environ())
	fmt.Fprintf(os.Stderr, "gorolling: exec %s: %v\n", args[0], err)
	return 127
}
