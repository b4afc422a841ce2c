# Shared by the maintainer scripts of the gorolling .deb and .rpm. POSIX sh.
# Works with systemd as pid 1 and without it (containers, chroots, CI).

gorolling_bin=@BIN@
gorolling_rundir=@RUNDIR@

# systemd_running succeeds when systemd is the init system (sd_booted(3)).
systemd_running() {
	[ -d @SYSTEMD_RUNDIR@ ]
}

# daemon_reload makes systemd re-read the unit files. A failure is logged
# and ignored: the package operation has succeeded either way.
daemon_reload() {
	systemd_running || return 0
	systemctl daemon-reload || echo "gorolling: warning: systemctl daemon-reload failed" >&2
}

# with_timeout runs a command for at most @UPGRADE_TIMEOUT@ seconds when
# timeout(1) exists.
with_timeout() {
	if command -v timeout >/dev/null 2>&1; then
		timeout @UPGRADE_TIMEOUT@ "$@"
	else
		"$@"
	fi
}

# upgrade_masters makes every running master (one control socket each)
# re-exec itself onto the binary just installed. Its sockets and workers
# carry over: nothing is stopped or restarted. A master that cannot be
# upgraded keeps running the old binary; that is logged, never fatal.
upgrade_masters() {
	[ -x "$gorolling_bin" ] || return 0
	for sock in "$gorolling_rundir"/*.sock; do
		[ -S "$sock" ] || continue
		echo "gorolling: re-executing the master behind $sock onto the new binary"
		if with_timeout "$gorolling_bin" upgrade --master --wait --control "$sock"; then
			:
		else
			echo "gorolling: warning: the master behind $sock was not upgraded and runs the old binary until it restarts; retry with: $gorolling_bin upgrade --master --wait --control $sock" >&2
		fi
	done
}

# stop_units stops every running gorolling@ instance; each master drains
# its workers first.
stop_units() {
	systemd_running || return 0
	systemctl stop 'gorolling@*.service' || echo "gorolling: warning: could not stop every gorolling@ unit" >&2
}

# forget_instances removes the links "systemctl enable gorolling@NAME"
# left behind once the template they point to is gone. The operator's
# /etc/gorolling/*.conf files are kept.
forget_instances() {
	[ -d @SYSTEMD_CONFDIR@ ] || return 0
	find @SYSTEMD_CONFDIR@ -maxdepth 2 -type l -name 'gorolling@*.service' 2>/dev/null |
		while IFS= read -r link; do
			[ -e "$link" ] || rm -f "$link" || true
		done
}
