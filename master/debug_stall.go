//go:build gorolling_debug

package master

// DebugStall takes the master's lock and never lets go: the master is
// stuck as a deadlock would leave it, for the watchdog test. It exists
// only in binaries built with the gorolling_debug tag.
func (m *Master) DebugStall() {
	m.mu.Lock()
	select {}
}
