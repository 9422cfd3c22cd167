"""The floors every other figure is read against, measured in the same run.

A sandboxed launch is compared with a bare ``fork()`` and with a bare interpreter start, an API
read with the same read done directly through SQLAlchemy, and a trivial task through the whole
system with the same function called in-process. The helpers here are public so that other
benchmarks can measure the very same baseline next to their own figure, rather than copy it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.harness import (
    Row,
    Stats,
    figure,
    progress,
    rounds_rate,
    time_batches,
    time_each,
    timed_rounds,
)

NAME = "baselines"
DESCRIPTION = (
    "same-run floors: fork+waitpid, python -I -c pass, direct SQLAlchemy read, in-process call"
)

BASELINE_KEY = "bench_baseline_var"


def fork_and_wait() -> None:
    """The cheapest possible child: fork, exit at once, reap."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def spawn_python() -> None:
    """A fresh isolated interpreter doing nothing: what a spawn-mode sandbox cannot go below."""
    subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)


def trivial_task() -> None:
    """The trivial workload: what a "trivial task" runs once the machinery is out of the way."""


@contextmanager
def direct_reader(url: str, key: str) -> Iterator[Callable[[], str]]:
    """A function doing exactly the server's variable read (a read session, a primary-key
    ``session.get``) on ``url``, without HTTP or a token; the engine is disposed afterwards."""
    from privsep.server.db import Database
    from privsep.server.db.models import Variable

    db = Database.from_url(url)

    def read() -> str:
        with db.read_session() as session:
            variable = session.get(Variable, key)
            if variable is None:
                raise LookupError(f"variable {key!r} is missing from {db.display_url}")
            return variable.value

    try:
        read()  # fail before timing anything
        yield read
    finally:
        db.dispose()


@contextmanager
def variable_database(key: str = BASELINE_KEY) -> Iterator[str]:
    """A migrated SQLite database in a temporary directory holding one variable ``key``."""
    from privsep.server.db import Database, sqlite_url_for, upgrade
    from privsep.server.db.models import Variable

    with tempfile.TemporaryDirectory(prefix="privsep-bench-db-") as tmp:
        url = sqlite_url_for(Path(tmp) / "bench.db")
        upgrade(url)
        db = Database.from_url(url)
        try:
            with db.write_session() as session:
                session.add(Variable(key=key, value="s3://bench/target"))
        finally:
            db.dispose()
        yield url


def run(smoke: bool) -> list[Row]:
    rows: list[Row] = []

    progress("fork + waitpid")
    forks = time_each(fork_and_wait, repeat=20 if smoke else 1000, warmup=5 if smoke else 50)
    rows.append(figure("baseline: os.fork() + waitpid", Stats.of(forks).scaled(1e3), "ms"))

    progress("spawn python -I -c pass")
    spawns = time_each(spawn_python, repeat=3 if smoke else 50, warmup=1 if smoke else 3)
    rows.append(figure("baseline: spawn `python -I -c pass`", Stats.of(spawns).scaled(1e3), "ms"))

    progress("direct SQLAlchemy read (SQLite, primary key)")
    with variable_database() as url, direct_reader(url, BASELINE_KEY) as read:
        rounds = timed_rounds(
            read,
            rounds=2 if smoke else 5,
            seconds=0.2 if smoke else 1.0,
            warmup_seconds=0.1 if smoke else 0.5,
        )
    per_read = Stats.of([s for r in rounds for s in r]).scaled(1e6)
    rows.append(
        figure(
            "baseline: direct SQLAlchemy read of a variable (SQLite, PK select), latency",
            per_read,
            "µs",
        )
    )
    rows.append(
        figure(
            "baseline: direct SQLAlchemy read of a variable, one thread",
            rounds_rate(rounds),
            "reads/s",
            higher_is_better=True,
        )
    )

    progress("trivial workload floor (in-process call)")
    calls = time_batches(trivial_task, batch=10_000, repeat=5 if smoke else 50)
    rows.append(
        figure(
            "baseline: trivial workload floor, in-process call",
            Stats.of([1 / s for s in calls], higher_is_better=True),
            "calls/s",
            higher_is_better=True,
        )
    )
    return rows
