"""A soak: steady small runs for minutes, watching every long-lived process for growth.

``runner standalone`` (server, supervisor, zygote; SQLite, process sandboxes) runs a two-task
workflow over and over, one run after another, for ``PRIVSEP_SOAK_MINUTES`` (default 10; or
``python -m benchmarks.bench_soak --minutes N``). Every few seconds the RSS and the open file
descriptors of each long-lived process (the standalone parent, the server, the supervisor, the
zygote) are sampled with psutil. The figures are the least-squares slope of each series, in
MiB/min and fds/min, over the samples after the first tenth of the soak (start-up growth,
caches filling, is not a leak). A steady slope over ten minutes is a leak worth chasing; a
short soak says little, which is why the smoke mode's figures mean nothing.

    python -m benchmarks soak [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from benchmarks.e2e_system import SMALL, Standalone, standalone, write_atomically
from benchmarks.harness import Row, Stats, figure, progress

NAME = "soak"
DESCRIPTION = "RSS and fd slopes of every long-lived process over minutes of small runs"
ROLES = ("standalone", "server", "supervisor", "zygote")
WORKFLOW = "soak_small"
SMOKE_SECONDS = 6.0
SMOKE_SAMPLE_S = 0.5
FULL_SAMPLE_S = 5.0


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points; 0 for fewer than two distinct x."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def sample(system: Standalone) -> dict[str, tuple[float, float]]:
    """(RSS in MiB, open fds) per role, summed over that role's processes."""
    out: dict[str, tuple[float, float]] = {}
    for role, procs in system.processes().items():
        if role not in ROLES:
            continue
        rss = fds = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                rss += proc.memory_info().rss / 2**20
                fds += proc.num_fds()
        out[role] = (rss, fds)
    return out


def soak(system: Standalone, seconds: float, every: float) -> tuple[dict[str, list], int]:
    """Run the workflow back to back for ``seconds``, sampling every ``every`` seconds.
    Returns each role's samples as (minutes since start, RSS MiB, fds) and the runs done."""
    series: dict[str, list[tuple[float, float, float]]] = {role: [] for role in ROLES}
    start = time.monotonic()
    next_sample = start
    runs = 0
    while (now := time.monotonic()) - start < seconds:
        if now >= next_sample:
            for role, (rss, fds) in sample(system).items():
                series[role].append(((now - start) / 60, rss, fds))
            next_sample = now + every
        system.wait_run(system.trigger(WORKFLOW), timeout=120)
        runs += 1
    now = time.monotonic()
    for role, (rss, fds) in sample(system).items():
        series[role].append(((now - start) / 60, rss, fds))
    return series, runs


def minutes_from_env() -> float:
    return float(os.environ.get("PRIVSEP_SOAK_MINUTES", "10"))


def run(smoke: bool) -> list[Row]:
    if os.geteuid() != 0:
        raise PermissionError("the soak needs root: sandboxes drop to pool uids")
    seconds = SMOKE_SECONDS if smoke else minutes_from_env() * 60
    every = SMOKE_SAMPLE_S if smoke else FULL_SAMPLE_S
    root = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))  # unix socket paths ≤ 107 bytes
    root.chmod(0o755)
    try:
        flows = root / "wf"
        flows.mkdir(mode=0o755)
        write_atomically(flows, f"{WORKFLOW}.py", SMALL.format(workflow_id=WORKFLOW))
        progress("runner standalone for the soak")
        with standalone(root / "h", flows, parallelism=2, uid_count=200) as system:
            system.wait_parsed([WORKFLOW])
            system.wait_run(system.trigger(WORKFLOW), timeout=120)  # warm-up
            progress(f"soak: {seconds / 60:g} min of back-to-back runs")
            series, runs = soak(system, seconds, every)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows(series, runs, seconds)


def rows(
    series: dict[str, list[tuple[float, float, float]]], runs: int, seconds: float
) -> list[Row]:
    out: list[Row] = []
    for role in ROLES:
        points = series[role]
        if not points:
            continue
        kept = [p for p in points if p[0] >= points[-1][0] / 10] or points
        # A cache filling up slows down and stops; a leak keeps its pace. The second half's
        # slope beside the whole one tells them apart.
        late = [p for p in points if p[0] >= points[-1][0] / 2] or points
        note = (
            f"{len(kept)} samples over {seconds / 60:g} min, {runs} runs; "
            f"RSS {points[0][1]:.1f} → {points[-1][1]:.1f} MiB "
            f"(second half {slope([(p[0], p[1]) for p in late]):+.2f} MiB/min), "
            f"fds {points[0][2]:.0f} → {points[-1][2]:.0f}"
        )
        for index, unit, label in ((1, "MiB/min", "RSS"), (2, "fds/min", "open fds")):
            value = slope([(p[0], p[index]) for p in kept])
            out.append(figure(f"soak: {label} slope, {role}", Stats.of([value]), unit, note=note))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench_soak --minutes N``: the soak alone, for as long as asked."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_soak")
    parser.add_argument("--minutes", type=float, default=minutes_from_env())
    args = parser.parse_args(argv)
    os.environ["PRIVSEP_SOAK_MINUTES"] = str(args.minutes)
    from benchmarks.harness import main as suite

    return suite(["soak"])


if __name__ == "__main__":
    sys.exit(main())
