#!/usr/bin/env python3
"""A stdlib-only HTTP server that runs under gorolling, under systemd socket
activation, or standalone.

Under gorolling (gorolling exec --listen tcp://:8080 -- python3 server.py):
  * it serves on the first pre-opened socket, fd 3 (LISTEN_FDS, checked
    against LISTEN_PID as sd_listen_fds() does);
  * it says READY=1 on $NOTIFY_SOCKET once it serves;
  * on SIGTERM it drains without failing a keep-alive client: it stops
    accepting (the master keeps the socket for the next generation), answers
    every further request with "Connection: close", waits a grace period for
    clients to leave, then closes what is left and exits 0.
It keeps the inherited socket non-blocking: the socket is shared with the
other workers, O_NONBLOCK belongs to all of them, and a worker blocked in
accept(2) cannot notice SIGTERM.

Standalone it binds $PORT (default 8080) itself.
Every response carries X-Pid, X-Slot and X-Generation.
"""
import http.server
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time

GRACE = float(os.environ.get("DRAIN_GRACE", "2"))  # seconds


def listen_fds():
    """The sd_listen_fds() protocol: fds 3.. if LISTEN_PID is our pid."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    n = int(os.environ.get("LISTEN_FDS", "0"))
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    fds = list(range(3, 3 + n))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def sd_notify(state):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(path)
        s.sendall(state.encode())


def report(**fields):
    """For the integration tests: one JSON line to $PY_REPORT."""
    path = os.environ.get("PY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")


def _open_fds():
    out = []
    for fd in range(256):
        try:
            os.fstat(fd)
            out.append(fd)
        except OSError:
            pass
    return out


# What this process inherited, probed before the server opens anything.
START_FDS = _open_fds()
ENV_AT_START = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "GOROLLING_FD", "NOTIFY_SOCKET")}

draining = threading.Event()
conns = set()
conns_lock = threading.Lock()
PID = str(os.getpid())
SLOT = os.environ.get("GOROLLING_SLOT", "-1")
GEN = os.environ.get("GOROLLING_GENERATION", "0")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = f"hello from python pid {PID}, slot {SLOT}, generation {GEN}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Pid", PID)
        self.send_header("X-Slot", SLOT)
        self.send_header("X-Generation", GEN)
        if draining.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self, sock):
        # Take the inherited socket as it is: no bind, no listen, and no
        # change to its blocking mode.
        super().__init__(sock.getsockname(), Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock

    # Connections are counted from the moment accept() returns, in the
    # serving thread, not when their handler thread gets going: a drain that
    # looked only at running handlers could exit with a connection accepted
    # a moment earlier, and the kernel would reset it.
    def process_request(self, request, client_address):
        with conns_lock:
            conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with conns_lock:
            conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        pass


def main():
    fds = listen_fds()
    report(op="start", pid=os.getpid(), fds=START_FDS, env=ENV_AT_START, activated=fds)
    if fds:
        sock = socket.socket(fileno=fds[0])
        # Shared with other workers: accept must never block (a worker that
        # loses the race for a connection would hang in accept). gorolling
        # hands sockets over non-blocking already; this keeps it so.
        sock.setblocking(False)
    else:
        sock = socket.create_server(("127.0.0.1", int(os.environ.get("PORT", "8080"))), backlog=1024)
    server = Server(sock)

    # The signal handler only writes a byte to a pipe: doing more there
    # (starting a thread, taking a lock) can deadlock with whatever the main
    # thread was doing when the signal came. A watcher thread does the rest.
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC)

    def on_term(signum, frame):
        os.write(wake_w, b"x")

    def watcher():
        os.read(wake_r, 1)
        draining.set()
        server.shutdown()

    threading.Thread(target=watcher, daemon=True).start()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sd_notify("READY=1\nSTATUS=serving")
    server.serve_forever(poll_interval=0.05)

    # Draining: stop accepting (closes only our copy of the socket).
    sd_notify("STOPPING=1")
    server.socket.close()
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline:
        with conns_lock:
            if not conns:
                break
        time.sleep(0.02)
    # Whatever is still open has been idle through the whole grace period.
    with conns_lock:
        left = list(conns)
    for c in left:
        try:
            c.shutdown(socket.SHUT_RD)
        except OSError:
            pass
    end = time.monotonic() + 5
    while time.monotonic() < end:
        with conns_lock:
            if not conns:
                break
        time.sleep(0.02)
    sys.exit(0)


if __name__ == "__main__":
    main()
