// Package events names the steps of a master's life that its log records.
// Every log line that marks one carries the key "event" with one of these
// values, next to a message for people. Tests and log pipelines match on
// the event, never on the message, so rewording a message breaks nothing,
// and renaming an event breaks the build of whatever depends on it.
package events

// Key is the log key that carries the event.
const Key = "event"

// Master.
const (
	MasterStarting       = "master.starting"       // pid, version, successor
	MasterStopping       = "master.stopping"       // a graceful stop began
	MasterHandingOver    = "master.handing_over"   // a successor serves: this master drains and exits
	MasterStopped        = "master.stopped"        // every worker is gone
	InheritedAdopted     = "socket.inherited"      // fd, addr, name
	ListenerPreopened    = "socket.preopened"      // spec, addr, name
	ListenerHandedOver   = "socket.handed_over"    // key, addr (debug level)
	ListenerClosed       = "socket.closed"         // key: no live worker held it
	GenerationStarting   = "generation.starting"   // generation, workers
	GenerationServing    = "generation.serving"    // the first generation serves
	GenerationDraining   = "generation.draining"   // generation
	GenerationStopped    = "generation.stopped"    // generation
	WorkerOnline         = "worker.online"         // generation, slot, pid, worker_id
	WorkerReady          = "worker.ready"          // via: handoff, notify or timer
	WorkerExited         = "worker.exited"         // status
	WorkerRespawning     = "worker.respawning"     // backoff
	WorkerKilled         = "worker.killed"         // still running after the drain timeout
	WorkerViolation      = "worker.violation"      // reason: it broke the protocol and is stopped
	WorkerStatus         = "worker.status"         // status: its STATUS= text
	WorkerThrottled      = "worker.throttled"      // channel: handoff or notify
	WorkerNotifyIgnored  = "worker.notify_ignored" // reason, sender_pid
	ListenRefused        = "worker.listen_refused" // key, error: a cap (logged once per worker and cap)
	ListenFailed         = "worker.listen_failed"  // key, error (once per worker and errno)
	ControlRefused       = "control.refused"       // uid, peer_pid
	MasterRestarted      = "master.restarted"      // sockets, workers: started with what the fd store kept of a master that died
	StoredAdopted        = "socket.from_store"     // key, addr: a socket the fd store kept
	StoreSynced          = "fdstore.synced"        // added, removed, held (debug level)
	StoreFailed          = "fdstore.failed"        // error
	WatchdogEnabled      = "watchdog.enabled"      // timeout
	MetricsServing       = "metrics.serving"       // addr: --metrics listens there
	OrphanReaped         = "orphan.reaped"         // pid, status (as pid 1, debug level)
	ConnHandedOver       = "conn.handed_over"      // key, to_worker_id (debug level)
	PlacementUnavailable = "placement.unavailable" // error: BPF refused; the kernel's hash spreads connections
	PlacementUpdated     = "placement.updated"     // group, members, active (debug level): logged before the update applies
)

// Upgrades.
const (
	UpgradeStarted        = "upgrade.started"         // from
	UpgradeReady          = "upgrade.ready"           // generation
	UpgradeFinished       = "upgrade.finished"        // generation, from, duration
	UpgradeRolledBack     = "upgrade.rolled_back"     // generation, serving, reason
	MasterUpgradeStarted  = "master_upgrade.started"  // from
	MasterUpgradeFailed   = "master_upgrade.failed"   // reason: this master keeps serving
	MasterUpgradeFallback = "master_upgrade.fallback" // reason: a HUP upgrades the workers instead
	MasterUpgradeServing  = "master_upgrade.serving"  // pid: logged by the new master
	MasterUpgradeReady    = "master_upgrade.ready"    // new_pid: logged by the old master
)
