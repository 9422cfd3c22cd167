"""A closed-loop HTTP/1.1 load generator, run as its own process: ``python -m benchmarks.loadgen``.

Why not ``wrk`` or httpx: the server and the load share two cores, so the client must cost as
little CPU as possible, and the project must not depend on a tool it does not install. One
thread drives every connection through ``epoll`` (``selectors``) with a pre-built request and
minimal response parsing (status line and ``Content-Length``): a few microseconds of client CPU
per request, reported back so the reader can see what the load itself cost. Each connection
is persistent (keep-alive) and has one request in flight, so ``concurrency`` connections are
``concurrency`` concurrent clients.

Input: one JSON object on stdin (the bearer token travels there, not on the command line where
``ps`` would show it)::

    {"tcp": ["127.0.0.1", 8780] | null, "unix": "/path/api.sock" | null,
     "path": "/v1/...", "token": "..." | null, "concurrency": 16,
     "warmup": 1.0, "rounds": 5, "round_seconds": 2.0}

Output: one JSON object on stdout: per-round requests, seconds and latency percentiles, the
pooled latency percentiles of all measured requests, status counts, and the CPU seconds this
process used.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.harness import percentile

_HEADER_END = b"\r\n\r\n"


class LoadError(RuntimeError):
    """The server answered in a way the generator cannot count (framing it does not parse)."""


@dataclass
class Connection:
    sock: socket.socket
    buffer: bytes = b""
    need: int = -1  # total bytes of the response being read, once its header is in
    status: int = 0
    sent_at: float = 0.0


@dataclass
class Phase:
    name: str
    seconds: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    started: float = 0.0
    ended: float = 0.0


def connect(config: dict[str, Any]) -> socket.socket:
    if config.get("unix"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(config["unix"])
    else:
        host, port = config["tcp"]
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def build_request(config: dict[str, Any]) -> bytes:
    lines = [f"GET {config['path']} HTTP/1.1", "Host: 127.0.0.1", "Accept: application/json"]
    if config.get("token"):
        lines.append(f"Authorization: Bearer {config['token']}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def _parse_header(conn: Connection) -> None:
    end = conn.buffer.find(_HEADER_END)
    if end < 0:
        return
    head = conn.buffer[:end].lower()
    conn.status = int(head[9:12])
    marker = head.find(b"\r\ncontent-length:")
    if marker < 0:
        raise LoadError("response without Content-Length (chunked?); the generator needs one")
    value_end = head.find(b"\r\n", marker + 2)
    length = int(head[marker + 17 : value_end if value_end >= 0 else len(head)])
    conn.need = end + len(_HEADER_END) + length


def generate(config: dict[str, Any]) -> dict[str, Any]:
    """Run the warm-up and the rounds; return what :func:`main` prints."""
    request = build_request(config)
    phases = [Phase("warmup", float(config["warmup"]))]
    phases += [Phase(f"round{i}", float(config["round_seconds"])) for i in range(config["rounds"])]
    selector = selectors.DefaultSelector()
    conns = [Connection(connect(config)) for _ in range(int(config["concurrency"]))]
    clock = time.perf_counter
    index = 0
    phase = phases[0]
    phase.started = clock()
    deadline = phase.started + phase.seconds
    cpu_start: resource.struct_rusage | None = None
    in_flight = 0
    for conn in conns:
        conn.sent_at = clock()
        conn.sock.send(request)
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        in_flight += 1
    sending = True
    while in_flight:
        for key, _ in selector.select(timeout=1.0):
            conn = key.data
            data = conn.sock.recv(65536)
            if not data:
                raise LoadError(f"the server closed a connection during {phase.name}")
            conn.buffer += data
            if conn.need < 0:
                _parse_header(conn)
            if conn.need < 0 or len(conn.buffer) < conn.need:
                continue
            now = clock()
            phase.latencies.append(now - conn.sent_at)
            phase.statuses[conn.status] = phase.statuses.get(conn.status, 0) + 1
            conn.buffer = conn.buffer[conn.need :]
            conn.need = -1
            if sending:
                conn.sent_at = now
                conn.sock.send(request)
            else:
                selector.unregister(conn.sock)
                in_flight -= 1
        now = clock()
        if sending and now >= deadline:
            phase.ended = now
            index += 1
            if index == 1:
                cpu_start = resource.getrusage(resource.RUSAGE_SELF)
            if index < len(phases):
                phase = phases[index]
                phase.started = now
                deadline = now + phase.seconds
            else:
                sending = False  # let the in-flight requests finish; they count in the last round
    for conn in conns:
        conn.sock.close()
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    measured = phases[1:]
    pooled = [latency for p in measured for latency in p.latencies]
    statuses: dict[int, int] = {}
    for p in phases:
        for status, count in p.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    cpu = 0.0
    if cpu_start is not None:
        cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    return {
        "rounds": [
            {
                "requests": len(p.latencies),
                "seconds": p.ended - p.started,
                "p50_ms": percentile(p.latencies, 50) * 1e3 if p.latencies else None,
                "p99_ms": percentile(p.latencies, 99) * 1e3 if p.latencies else None,
            }
            for p in measured
        ],
        "p50_ms": percentile(pooled, 50) * 1e3 if pooled else None,
        "p99_ms": percentile(pooled, 99) * 1e3 if pooled else None,
        "requests_total": sum(len(p.latencies) for p in phases),
        "requests_measured": len(pooled),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "client_cpu_s": cpu,
    }


def main() -> int:
    config = json.load(sys.stdin)
    json.dump(generate(config), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
