"""`serve` under a slowloris: many connections that send part of a request's headers and then
nothing, opened as fast as the machine allows, while a client asks ``/health`` every half second.

The server runs as ``selfforcing serve`` in its own process (as deployed); this script opens the
attackers' connections (each sends ``GET / HTTP/1.1``, a Host line, and never the blank line that
ends the headers, as a slowloris does) and, once all are open or refused, holds them for the header
timeout and a little more. Reported: the attackers' connections opened, the ones the server closed,
and the ``/health`` requests made, answered, and their slowest answer.

Run: ``python benchmarks/slowloris.py [--connections 19000] [--server-files 4096]`` (figures in
docs/PERFORMANCE.md, "The server under a slowloris"). Needs an open-file limit (``ulimit -n``)
above ``--connections``; ``--server-files`` below it shows a server running out of files.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request

HEADER_TIMEOUT_S = 10.0  # ServerOptions.header_timeout_s


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}) before serving")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return
        time.sleep(0.2)
    raise SystemExit("the server did not start within 120 s")


def watch_health(port: int, stop: threading.Event, latencies: list[float | None]) -> None:
    """Ask /health every half second; record each answer's latency, None for a failure."""
    while not stop.is_set():
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                response.read()
            latencies.append(time.perf_counter() - started)
        except OSError:
            latencies.append(None)
        stop.wait(0.5)


def attack(port: int, connections: int) -> tuple[list[socket.socket], int]:
    """Open ``connections`` half-requests; returns the open sockets and how many could not connect."""
    opened, failed = [], 0
    for _ in range(connections):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            opened.append(sock)
        except OSError:
            failed += 1
    return opened, failed


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=19000, help="attackers' connections to open")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="the server's --max-connections (default: its own; leave out for servers without it)")
    parser.add_argument("--server-files", type=int, default=None,
                        help="the server process's open-file limit (default: this process's)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.connections + 64:
        raise SystemExit(f"the open-file limit is {hard}: lower --connections below it")

    port = free_port()
    command = [sys.executable, "-m", "selfforcing", "serve", "--port", str(port)]
    if args.max_connections is not None:
        command += ["--max-connections", str(args.max_connections)]
    limit = args.server_files

    def server_limit() -> None:  # in the server's process, before it starts
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=server_limit)
    try:
        wait_until_serving(port, server)
        stop, latencies = threading.Event(), []
        watcher = threading.Thread(target=watch_health, args=(port, stop, latencies), daemon=True)
        watcher.start()
        started = time.perf_counter()
        sockets, failed = attack(port, args.connections)
        opening_s = time.perf_counter() - started
        time.sleep(HEADER_TIMEOUT_S + 2)  # every half-request is past the header timeout now
        stop.set()
        watcher.join()
        closed = sum(closed_by_server(sock) for sock in sockets)
        answered = [latency for latency in latencies if latency is not None]
        print(f"attack: {len(sockets)} of {args.connections} connections opened in {opening_s:.1f} s "
              f"({failed} could not connect); {closed} closed by the server by the end")
        print(f"/health: {len(answered)} of {len(latencies)} requests answered during the attack; "
              f"slowest {max(answered, default=float('nan')):.3f} s, median "
              f"{sorted(answered)[len(answered) // 2] if answered else float('nan'):.3f} s")
        for sock in sockets:
            sock.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
