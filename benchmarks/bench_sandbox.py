"""Sandbox launch latency and idle memory, against raw ``os.fork()`` and ``python -I -c``.

Issue 4's targets for template mode: launch request → user code running p50 ≤ 10 ms and p99 ≤
25 ms with full isolation, ≤ 5 MiB USS per idle child, and 2,000 concurrent sleeping sandboxes.

"User code running" is measured literally: the sandboxed script's first statement connects to its
credential socket and sends a byte; the clock stops when the supervisor side receives it. The
baselines stop their clocks the same way (first byte from the child's own code). Everything runs
in one process, in one run, on the same machine.

    python -m benchmarks sandbox                      # through the suite's harness
    python -m benchmarks.bench_sandbox [--smoke] [--scale 2000]   # this one, as a table

``run(smoke)`` returns the harness's rows (``measure, ours, ours_p99, baseline, ratio, target,
unit``, ...); targets are figures to watch, never assertions. Needs root (pool uids, cgroups).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from benchmarks.harness import Row, Stats, figure, progress
from privsep.sandbox import ExitReason, Limits, ProcessBackend, SandboxSpec, UidPool

NAME = "sandbox"
DESCRIPTION = (
    "process sandbox: launch → user code running and idle USS, template and spawn modes, "
    "vs os.fork() and python -I -c"
)
RUN_PATH = "privsep.sandbox.entrypoints:run_path"
SIGNAL_THEN_IDLE = """\
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["PRIVSEP_CREDENTIAL_SOCKET"])
s.sendall(b"x")
if sys.argv[1:] == ["idle"]:
    s.recv(1)  # blocks until the benchmark closes the socket
"""
MiB = 1 << 20


class SandboxBench:
    """A temporary bundle and work area; one listening socket per sandbox."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.chmod(0o755)
        self.bundle = root / "bundle"
        self.bundle.mkdir(mode=0o755)
        self.script = self.bundle / "user.py"
        self.script.write_text(SIGNAL_THEN_IDLE)
        self.script.chmod(0o644)
        self.n = 0

    def spec(self, *argv: str) -> tuple[SandboxSpec, socket.socket]:
        self.n += 1
        run = self.root / f"run{self.n}"
        run.mkdir(mode=0o700)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(run / "cred.sock"))
        listener.listen(1)
        spec = SandboxSpec(
            kind="task",
            entry_point=RUN_PATH,
            argv=(str(self.script), *argv),
            workdir=str(self.root / f"work{self.n}"),
            bundle_paths=(str(self.bundle),),
            credential_socket=str(run / "cred.sock"),
            limits=Limits(wall_seconds=600, memory_bytes=256 * MiB, pids=64),
        )
        return spec, listener


def launch_latencies(
    backend: Any, bench: SandboxBench, n: int, *, wait_s: float = 30
) -> tuple[list[float], list[float]]:
    """Seconds from ``launch()`` to the first byte from user code, and to the final status,
    ``n`` times in a row, on any backend (process or container)."""
    running, reaped = [], []
    for _ in range(n):
        spec, listener = bench.spec()
        start = time.perf_counter()
        handle = backend.launch(spec)
        conn, _ = listener.accept()
        conn.recv(1)
        running.append(time.perf_counter() - start)
        conn.close()
        listener.close()
        status = handle.wait(wait_s)
        reaped.append(time.perf_counter() - start)
        if status is None or status.reason is not ExitReason.SUCCEEDED:
            raise RuntimeError(f"benchmark sandbox failed: {status}\n{handle.output().text}")
    return running, reaped


def sandbox_latency(backend: ProcessBackend, bench: SandboxBench, n: int) -> list[float]:
    """Seconds from ``launch()`` to the first byte from user code, ``n`` times in a row."""
    return launch_latencies(backend, bench, n)[0]


def fork_latency(n: int) -> list[float]:
    """Seconds from ``os.fork()`` to the first byte written by the child."""
    out = []
    for _ in range(n):
        r, w = os.pipe()
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.write(w, b"x")
            os._exit(0)
        os.read(r, 1)
        out.append(time.perf_counter() - start)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
    return out


def python_latency(n: int) -> list[float]:
    """Seconds from spawning ``python -I -c`` to the first byte its code writes."""
    out = []
    code = "import os; os.write(1, b'x')"
    for _ in range(n):
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", "-c", code], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        proc.stdout.read(1)
        out.append(time.perf_counter() - start)
        proc.wait()
    return out


def _children_cpu(pid: int) -> float:
    """CPU seconds (user + system) of the children ``pid`` has reaped, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime


def _wait_warm(backend: ProcessBackend, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(backend.warm_pids()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)


def sandbox_cpu(backend: ProcessBackend, bench: SandboxBench, n: int, prewarm: int) -> float:
    """Mean CPU seconds of everything a template sandbox runs, from fork to reaped, ``n`` times.

    Every process of a sandbox descends from the zygote, which reaps its own children, so the
    zygote's ``cutime + cstime`` grows by exactly the sandboxes that ended. Both readings are
    taken with the pre-warmed pool full, so the ``n`` launches are ``n`` whole lifecycles.
    """
    zygote = backend.zygote_pid
    if zygote is None:
        raise RuntimeError("sandbox_cpu needs a template-mode backend")
    _wait_warm(backend, prewarm)
    before = _children_cpu(zygote)
    sandbox_latency(backend, bench, n)
    _wait_warm(backend, prewarm)
    return (_children_cpu(zygote) - before) / n


def fork_cpu(n: int) -> float:
    """Mean CPU seconds of an ``os.fork()`` child of this process that exits at once."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return used / n


def _uss(pid: int) -> int:
    return int(psutil.Process(pid).memory_full_info().uss)


def _tree_uss(pid: int) -> tuple[int, int]:
    """(USS of the whole tree under and including ``pid``, USS of its deepest child)."""
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    total = sum(int(p.memory_full_info().uss) for p in procs)
    return total, int(procs[-1].memory_full_info().uss)


@contextlib.contextmanager
def idle_sandboxes(backend: ProcessBackend, bench: SandboxBench, n: int) -> Iterator[list[Any]]:
    """``n`` sandboxes whose user code has started and now blocks; closed on exit."""
    live: list[Any] = []
    try:
        for _ in range(n):
            spec, listener = bench.spec("idle")
            handle = backend.launch(spec)
            conn, _ = listener.accept()
            conn.recv(1)
            listener.close()
            live.append((handle, conn))
        yield live
    finally:
        for _, conn in live:
            conn.close()
        for handle, _ in live:
            if handle.wait(30) is None:
                handle.kill(grace=0)
                handle.wait(30)


def idle_uss(backend: ProcessBackend, bench: SandboxBench, n: int) -> tuple[float, float]:
    """Mean USS (bytes) of an idle sandbox: all its processes (with any monitor); user only."""
    with idle_sandboxes(backend, bench, n) as live:
        time.sleep(0.3)
        pairs = [_tree_uss(h.pid) for h, _ in live]
    return statistics.mean(p[0] for p in pairs), statistics.mean(p[1] for p in pairs)


def fork_idle_uss(n: int) -> float:
    """Mean USS of idle ``os.fork()`` children of this (benchmark) process."""
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            time.sleep(3600)
            os._exit(0)
        pids.append(pid)
    time.sleep(0.3)
    try:
        return statistics.mean(_uss(pid) for pid in pids)
    finally:
        for pid in pids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def python_idle_uss(n: int) -> float:
    """Mean USS of idle ``python -I -c 'sleep'`` processes."""
    procs = [
        subprocess.Popen([sys.executable, "-I", "-c", "import time; time.sleep(3600)"])
        for _ in range(n)
    ]
    time.sleep(1.0)
    try:
        return statistics.mean(_uss(p.pid) for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def scale(backend: ProcessBackend, bench: SandboxBench, n: int) -> tuple[int, float]:
    """Start ``n`` idle sandboxes at once; returns how many ran and the seconds it took."""
    start = time.perf_counter()
    with idle_sandboxes(backend, bench, n) as live:
        took = time.perf_counter() - start
        alive = sum(1 for h, _ in live if h.status is None)
    return alive, took


def run(smoke: bool, scale_n: int | None = None) -> list[Row]:
    """Measure everything; ``smoke`` keeps iteration counts tiny. Needs root."""
    iterations = 5 if smoke else 300
    idle_n = 3 if smoke else 50
    scale_n = scale_n if scale_n is not None else (5 if smoke else 200)
    root = Path(tempfile.mkdtemp(prefix="privsep-bench-"))
    try:
        bench = SandboxBench(root)
        progress("baselines: os.fork() and python -I -c")
        fork_ms = Stats.of(fork_latency(iterations)).scaled(1e3)
        fork_cpu_ms = Stats.single(fork_cpu(iterations) * 1e3)
        python_ms = Stats.of(python_latency(max(3, iterations // 6))).scaled(1e3)
        pool = UidPool(400_000, max(scale_n, idle_n) + 64)
        prewarm = 4
        with ProcessBackend(launch_mode="template", uid_pool=pool, prewarm=prewarm) as template:
            progress(f"template mode: {iterations} launches")
            sandbox_latency(template, bench, 5)  # warm-up
            tmpl_ms = Stats.of(sandbox_latency(template, bench, iterations)).scaled(1e3)
            progress(f"template mode: CPU of {iterations} launches")
            tmpl_cpu_ms = Stats.single(sandbox_cpu(template, bench, iterations, prewarm) * 1e3)
            progress(f"template mode: {idle_n} idle sandboxes")
            tmpl_uss, tmpl_user_uss = idle_uss(template, bench, idle_n)
            progress(f"template mode: {scale_n} concurrent sandboxes")
            alive, took = scale(template, bench, scale_n)
        with ProcessBackend(launch_mode="spawn", uid_pool=pool) as spawn:
            progress(f"spawn mode: {max(3, iterations // 6)} launches")
            spawn_ms = Stats.of(sandbox_latency(spawn, bench, max(3, iterations // 6))).scaled(1e3)
            spawn_uss, spawn_user_uss = idle_uss(spawn, bench, max(2, idle_n // 5))
        progress("baselines: idle USS")
        fork_uss = Stats.single(fork_idle_uss(idle_n) / MiB)
        python_uss = Stats.single(python_idle_uss(max(2, idle_n // 5)) / MiB)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    fork_what, python_what = "os.fork() → child's code", "python -I -c → its code"
    full = "full isolation: namespaces, pool uid, rlimits, cgroups, seccomp"
    scale_row = figure(
        f"concurrent sleeping sandboxes, template ({scale_n} started)",
        Stats.single(alive),
        "sandboxes",
        target=">= 2000 sandboxes" if scale_n >= 2000 else None,
        note=f"all {scale_n} up in {took:.1f} s" if alive == scale_n else "some failed",
    )
    if scale_n < 2000:
        scale_row["note"] += "; the 2,000 target needs --scale 2000"
    return [
        figure(
            "template: launch → user code running (p50)",
            tmpl_ms,
            "ms",
            baseline=fork_ms,
            baseline_measure=fork_what,
            target="p50 <= 10 ms",
            note=full,
        ),
        figure(
            "template: launch → user code running (p99)",
            tmpl_ms,
            "ms",
            baseline=fork_ms,
            baseline_measure=fork_what,
            target="p99 <= 25 ms",
        ),
        figure(
            "template: CPU per sandbox, fork to reaped (trivial script)",
            tmpl_cpu_ms,
            "ms",
            baseline=fork_cpu_ms,
            baseline_measure="os.fork() child that exits at once",
            note="zygote's reaped children (cutime + cstime, 10 ms ticks) over the launches",
        ),
        figure(
            "spawn: launch → user code running",
            spawn_ms,
            "ms",
            baseline=python_ms,
            baseline_measure=python_what,
            note=full,
        ),
        figure(
            "template: idle sandbox USS (all its processes)",
            Stats.single(tmpl_uss / MiB),
            "MiB",
            baseline=fork_uss,
            baseline_measure="idle os.fork() child of this process",
            target="<= 5 MiB",
        ),
        figure(
            "template: idle user process USS",
            Stats.single(tmpl_user_uss / MiB),
            "MiB",
            baseline=fork_uss,
            baseline_measure="idle os.fork() child of this process",
        ),
        figure(
            "spawn: idle sandbox USS (monitor + user process)",
            Stats.single(spawn_uss / MiB),
            "MiB",
            baseline=python_uss,
            baseline_measure="idle python -I -c",
        ),
        figure(
            "spawn: idle user process USS",
            Stats.single(spawn_user_uss / MiB),
            "MiB",
            baseline=python_uss,
            baseline_measure="idle python -I -c",
        ),
        scale_row,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--smoke", action="store_true", help="tiny iteration counts")
    parser.add_argument("--scale", type=int, default=None, help="concurrent sandboxes to start")
    args = parser.parse_args()
    rows = run(args.smoke, args.scale)
    width = max(len(r["measure"]) for r in rows)
    print(f"{'measure':<{width}}  {'ours':>8}  {'p99':>8}  {'baseline':>8}  {'ratio':>6}  target")
    for r in rows:
        cells = [r["ours"], r["ours_p99"], r["baseline"], r["ratio"]]
        text = ["-" if v is None else f"{v:.2f}" for v in cells]
        print(
            f"{r['measure']:<{width}}  {text[0]:>8}  {text[1]:>8}  {text[2]:>8}  {text[3]:>6}  "
            f"{r['target'] or '-'} ({r['unit']}) {r['note']}"
        )


if __name__ == "__main__":
    main()
