#!/usr/bin/env node
// An HTTP server in Node.js that runs under gorolling, under systemd socket
// activation, or standalone.
//
// Under gorolling (gorolling exec --listen tcp://:8080 -- node server.js):
//   * it serves on the first pre-opened socket with server.listen({fd: 3})
//     (LISTEN_FDS, checked against LISTEN_PID as sd_listen_fds() does);
//   * it says READY=1 through systemd-notify once it listens (Node has no
//     datagram unix sockets); without systemd-notify, run gorolling with
//     --ready=timer:1s instead;
//   * on SIGTERM it drains without failing a keep-alive client: it stops
//     accepting (the master keeps the socket for the next generation) but,
//     unlike a plain server.close() (which in Node >= 19 closes idle
//     keep-alive connections at once), keeps idle connections open for a
//     grace period, answering every request with "Connection: close"; then
//     it closes what is still idle and exits when the last one ends.
// Standalone it binds $PORT (default 8080).
// Every response carries X-Pid, X-Slot and X-Generation.
'use strict';

const http = require('http');
const { execFile } = require('child_process');

const GRACE_MS = Number(process.env.DRAIN_GRACE_MS || 2000);
const pid = String(process.pid);
const slot = process.env.GOROLLING_SLOT || '-1';
const generation = process.env.GOROLLING_GENERATION || '0';
let draining = false;

function listenFds() {
  if (process.env.LISTEN_PID !== pid) return [];
  const n = Number(process.env.LISTEN_FDS || 0);
  delete process.env.LISTEN_PID;
  delete process.env.LISTEN_FDS;
  delete process.env.LISTEN_FDNAMES;
  return Array.from({ length: n }, (_, i) => 3 + i);
}

function sdNotify(state) {
  if (!process.env.NOTIFY_SOCKET) return;
  const args = state.split('\n').filter(Boolean);
  execFile('systemd-notify', args, (err) => {
    if (err) console.error(`server.js: systemd-notify ${args.join(' ')}: ${err.message} (use gorolling --ready=timer:DURATION)`);
  });
}

const server = http.createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    const headers = {
      'Content-Type': 'text/plain; charset=utf-8',
      'X-Pid': pid,
      'X-Slot': slot,
      'X-Generation': generation,
    };
    if (draining) headers.Connection = 'close';
    res.writeHead(200, headers);
    res.end(`hello from node pid ${pid}, slot ${slot}, generation ${generation}\n`);
  });
});

const fds = listenFds();
const onListening = () => sdNotify('--ready');
if (fds.length > 0) {
  server.listen({ fd: fds[0] }, onListening);
} else {
  server.listen(Number(process.env.PORT || 8080), '127.0.0.1', onListening);
}

function drain() {
  if (draining) return;
  draining = true;
  // server.close() stops accepting and then waits for every connection to
  // end; keep it from closing idle keep-alive connections right away.
  const closeIdle = server.closeIdleConnections.bind(server);
  server.closeIdleConnections = () => {};
  server.close(() => process.exit(0));
  setTimeout(closeIdle, GRACE_MS).unref();
  // Never outlive the master's drain timeout.
  setTimeout(() => process.exit(0), 25000).unref();
}
process.on('SIGTERM', drain);
process.on('SIGINT', drain);
