"""How ``runner server`` spreads connections over its pre-forked workers (privsep.server.serve).

A real server with two workers, real keep-alive connections over TCP and the unix socket:
each worker must end up with about half of them, whatever order the kernel woke them in, and
the server must still stop cleanly on SIGTERM.
"""

from __future__ import annotations

import contextlib
import http.client
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from privsep.server.serve import WorkerLoads

from .postgres import free_port
from .test_server_cli import env_for, prepared


def test_only_the_least_loaded_workers_accept() -> None:
    loads = WorkerLoads(3)
    assert loads.may_accept(0, 5)  # the others are not accepting yet: they do not count
    assert loads.may_accept(1, 2)
    assert not loads.may_accept(0, 5)  # worker 1 holds fewer
    assert loads.may_accept(2, 2) and loads.may_accept(1, 2)  # ties may all accept
    loads.publish(1, WorkerLoads.ABSENT)  # worker 1 stopped accepting
    loads.publish(2, WorkerLoads.ABSENT)
    assert loads.may_accept(0, 5)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.path)
        self.sock = sock


def _served(conn: http.client.HTTPConnection) -> None:
    conn.request("GET", "/v1/health")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200


def test_connections_are_spread_evenly_over_the_workers(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    prepared(home)
    port = free_port()
    sock_path = home / "run" / "server" / "api.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "privsep", "server"],
        env=env_for(
            home,
            PRIVSEP__SERVER__BIND=f"127.0.0.1:{port}",
            PRIVSEP__SERVER__WORKERS="2",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    conns: list[http.client.HTTPConnection] = []
    try:
        deadline = time.monotonic() + 60
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, http.client.HTTPException):
                probe = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                try:
                    _served(probe)
                finally:
                    probe.close()
                workers = psutil.Process(proc.pid).children()
                if len(workers) == 2 and sock_path.exists():
                    break
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        assert len(workers) == 2

        def held() -> list[int]:
            counts = []
            for worker in workers:
                tcp = [
                    c
                    for c in worker.net_connections(kind="tcp")
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
                ]
                unix = [c for c in worker.net_connections(kind="unix") if c.laddr == str(sock_path)]
                counts.append(len(tcp) + len(unix) - 1)  # minus the listening unix socket
            return counts

        # Until both workers accept (a worker spawned later than the other starts later),
        # open connections one by one: the least loaded worker takes each.
        probes: list[http.client.HTTPConnection] = []
        while min(held()) == 0:
            assert time.monotonic() < deadline, held()
            probes.append(http.client.HTTPConnection("127.0.0.1", port, timeout=10))
            _served(probes[-1])
        for probe in probes:
            probe.close()
        while sum(held()) != 0:
            assert time.monotonic() < deadline, held()
            time.sleep(0.05)
        time.sleep(0.5)  # the workers publish their lower counts
        # A burst of connects first, as a client pool opens them, then one request on each.
        for _ in range(8):
            conns.append(http.client.HTTPConnection("127.0.0.1", port, timeout=10))
            conns.append(_UnixHTTPConnection(str(sock_path)))
        for conn in conns:
            conn.connect()
        for conn in conns:
            _served(conn)
        spread = held()
        assert sum(spread) == 16, spread
        assert max(spread) - min(spread) <= 2, spread
    finally:
        for conn in conns:
            conn.close()
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_workers_do_not_outlive_a_killed_main_process(tmp_path: Path) -> None:
    """SIGKILL (or the OOM killer) on the main process: its workers must stop, and the port
    must be free for the next server, not kept by orphans that nobody supervises."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    prepared(home)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "privsep", "server"],
        env=env_for(home, PRIVSEP__SERVER__BIND=f"127.0.0.1:{port}", PRIVSEP__SERVER__WORKERS="2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        workers: list[psutil.Process] = []
        while len(workers) != 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
            workers = psutil.Process(proc.pid).children()
        probe = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while True:  # serving: the workers are past their start-up
            with contextlib.suppress(OSError, http.client.HTTPException):
                _served(probe)
                break
            assert time.monotonic() < deadline
            probe.close()
            time.sleep(0.1)
        probe.close()
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"workers outlived their main process: {[p.pid for p in alive]}"
        with socket.socket() as sock:  # the port is free again
            sock.bind(("127.0.0.1", port))
    finally:
        for worker in workers:
            with contextlib.suppress(psutil.Error):
                worker.kill()
