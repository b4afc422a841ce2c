//go:build race

package integration

// The binaries under test are built with the race detector too when the
// tests run with -race, so the master is race-checked under real load.
func init() { buildFlags = append(buildFlags, "-race") }
