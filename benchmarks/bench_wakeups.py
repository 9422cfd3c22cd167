"""Chain-step latency with and without Celery wake-ups (a real redis-server as the broker).

The same chain as the e2e benchmark (each task logs when its user code starts), run through
``runner standalone`` twice: once polling (the default), once with ``server.wakeups_broker``
and ``supervisor.wakeups = celery`` on a redis-server this benchmark starts on a free port. The
figure is upstream ``ended_at`` → downstream user code running, per step. With one supervisor
the downstream claim follows the upstream's own report in both modes (the supervisor claims at
once when a report it forwarded is accepted), so the two should be close: the row says what a
wake-up adds to the path (one publish after commit, off the request's thread), not what it
saves across nodes, where polling waits up to ``supervisor.poll_interval``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.bench_e2e import SMOKE, measure_chain
from benchmarks.e2e_system import CHAIN, Standalone, free_port, write_atomically
from benchmarks.harness import Row, Stats, figure, progress

NAME = "wakeups"
DESCRIPTION = "chain step latency (upstream success → downstream code running), polling vs Celery"

CHAIN_SMOKE = 4
CHAIN_FULL = 30
RUNS_FULL = 2


def _redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer") from None
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def _steps(root: Path, mode: str, broker: str, chain: int, runs: int) -> list[float]:
    flows = root / f"wf-{mode}"
    flows.mkdir(mode=0o755)
    write_atomically(flows, "e2e_chain.py", CHAIN.format(n=chain))
    system = Standalone(root / f"h-{mode}", flows, 2, 50)
    if mode == "celery":
        system.env.update(
            {
                "PRIVSEP__SERVER__WAKEUPS_BROKER": broker,
                "PRIVSEP__SUPERVISOR__WAKEUPS": "celery",
                "PRIVSEP__SUPERVISOR__WAKEUPS_BROKER": broker,
                "PRIVSEP__SUPERVISOR__POLL_INTERVAL": "30",
            }
        )
    try:
        progress(f"runner standalone, {mode}: {runs} chain runs of {chain} tasks")
        system.start()
        system.wait_parsed(["e2e_chain"])
        scale = SMOKE.__class__(**{**SMOKE.__dict__, "chain": chain, "chain_runs": runs})
        return measure_chain(system, scale).step_ms
    finally:
        system.stop()


def run(smoke: bool) -> list[Row]:
    if os.geteuid() != 0:
        raise PermissionError("the wake-ups benchmark needs root: sandboxes drop to pool uids")
    chain, runs = (CHAIN_SMOKE, 1) if smoke else (CHAIN_FULL, RUNS_FULL)
    root = Path(tempfile.mkdtemp(prefix="wk-", dir="/tmp"))  # unix socket paths ≤ 107 bytes
    root.chmod(0o755)
    redis_proc, broker = _redis(root)
    try:
        polled = Stats.of(_steps(root, "poll", broker, chain, runs))
        woken = Stats.of(_steps(root, "celery", broker, chain, runs))
    finally:
        redis_proc.send_signal(signal.SIGTERM)
        redis_proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    return [
        figure(
            "chain step, Celery wake-ups (one supervisor)",
            woken,
            "ms",
            baseline=polled,
            baseline_measure="the same chain, polling",
            note="upstream ended_at → downstream user code running; poll_interval 30 s",
        ),
        figure(
            "chain step, polling (one supervisor)",
            polled,
            "ms",
            note="upstream ended_at → downstream user code running; poll_interval 1 s",
        ),
    ]
