//go:build gorolling_debug

package main

import (
	"os"
	"time"
)

// In binaries built with the gorolling_debug tag (the watchdog test's), a
// master whose $GOROLLING_DEBUG_STALL_FILE appears removes the file and
// then holds its own lock for ever, as a deadlock would: it stops beating
// the watchdog, and answers nothing.
func init() {
	debugStall = func(d *daemon) {
		path := os.Getenv("GOROLLING_DEBUG_STALL_FILE")
		if path == "" {
			return
		}
		for {
			time.Sleep(20 * time.Millisecond)
			if os.Remove(path) == nil {
				d.log.Warn("debug: stalling the master on purpose")
				d.m.DebugStall()
			}
		}
	}
}
