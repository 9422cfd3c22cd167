"""The supervisor end to end: discovery → parse sandbox → task sandboxes → outcomes.

A real ``runner server`` and a real ``runner supervisor`` run as processes; every task runs in
a real process sandbox as a pool uid. Nothing is stubbed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack import Stack, running_stack

CHAIN = textwrap.dedent("""
    from privsep.client import Context, Workflow

    wf = Workflow("chain", schedule=None)

    @wf.task
    def extract(ctx: Context) -> dict:
        ctx.log.info("extracting for run %s", ctx.run_id)
        print("hello from the sandbox, uid", __import__("os").getuid())
        return {"rows": 3}

    @wf.task(upstream=[extract])
    def load(ctx: Context) -> int:
        return ctx.xcom_pull("extract")["rows"] * 2
""")

FLAKY = textwrap.dedent("""
    from privsep.client import Context, Workflow

    wf = Workflow("flaky", schedule=None)

    @wf.task(retries=1)
    def boom(ctx: Context) -> None:
        raise RuntimeError(f"try {ctx.try_number} failed on purpose")
""")

SILENT = textwrap.dedent("""
    import os
    from privsep.client import Context, Workflow

    wf = Workflow("silent", schedule=None)

    @wf.task
    def vanish(ctx: Context) -> None:
        os._exit(0)  # a clean exit that never reports the attempt's end
""")

SLOW = textwrap.dedent("""
    import time
    from privsep.client import Context, Workflow

    wf = Workflow("slow", schedule=None)

    @wf.task
    def nap(ctx: Context) -> str:
        time.sleep(float(ctx.params.get("seconds", 30)))
        return "rested"
""")


@pytest.fixture
def stack() -> Iterator[Stack]:
    with running_stack(
        "ps-",
        uid_first=140_000,
        PRIVSEP__SUPERVISOR__DRAIN_GRACE="3",
        PRIVSEP__SERVER__SUPERVISOR_HEARTBEAT_TIMEOUT="6",
    ) as s:
        for name, source in (("chain", CHAIN), ("flaky", FLAKY), ("slow", SLOW)):
            (s.home / "workflows" / f"{name}.py").write_text(source)
        yield s


def test_a_chain_runs_in_sandboxes_and_succeeds(stack: Stack) -> None:
    stack.start("supervisor", "supervisor")
    run_id = stack.trigger_when_parsed("chain")
    stack.wait_for(lambda: stack.run_state(run_id) in ("success", "failed"), 90, "chain run")
    attempts = stack.attempts(run_id)
    assert stack.run_state(run_id) == "success", attempts
    assert sorted(a["task_id"] for a in attempts) == ["extract", "load"]
    extract = next(a for a in attempts if a["task_id"] == "extract")
    logs = stack.runner("logs", extract["id"])
    assert logs.returncode == 0
    assert "hello from the sandbox, uid 1400" in logs.stdout  # a pool uid, not root
    health = stack.runner("health")
    assert health.returncode == 0, health.stdout
    assert stack.stop("supervisor") == 0


def _exit_codes(stack: Stack, run_id: str) -> dict[str, int | None]:
    """Each attempt's ``exit_code`` column, read from the server's database itself: only an
    outcome POST from the supervisor ever writes it, so it shows whether one arrived."""
    (db,) = stack.home.rglob("privsep.db")
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT task_id, exit_code FROM task_attempts WHERE run_id = ?", (run_id,)
        ).fetchall()
    return dict(rows)


def test_a_task_that_reported_its_end_and_exited_0_gets_no_second_outcome(stack: Stack) -> None:
    stack.start("supervisor", "supervisor")
    run_id = stack.trigger_when_parsed("chain")
    stack.wait_for(lambda: stack.run_state(run_id) in ("success", "failed"), 90, "chain run")
    assert stack.run_state(run_id) == "success"
    # Reaped, and (had it been sent) the outcome long answered: the supervisor drains.
    assert stack.stop("supervisor") == 0
    assert _exit_codes(stack, run_id) == {"extract": None, "load": None}


def test_a_task_that_exited_0_without_reporting_is_failed_by_its_outcome(stack: Stack) -> None:
    # Only here: another workflow in the shared folder would add parse sandboxes to every test.
    (stack.home / "workflows" / "silent.py").write_text(SILENT)
    stack.start("supervisor", "supervisor")
    run_id = stack.trigger_when_parsed("silent")
    stack.wait_for(lambda: stack.run_state(run_id) in ("success", "failed"), 90, "silent run")
    (attempt,) = stack.attempts(run_id)
    assert (stack.run_state(run_id), attempt["state"]) == ("failed", "failed")
    assert "sandbox exited without reporting an outcome" in (attempt["error"] or "")
    assert _exit_codes(stack, run_id) == {"vanish": 0}


def test_a_failing_task_is_retried_then_fails(stack: Stack) -> None:
    stack.start("supervisor", "supervisor")
    run_id = stack.trigger_when_parsed("flaky")
    stack.wait_for(lambda: stack.run_state(run_id) == "failed", 90, "flaky run to fail")
    tries = sorted((a["try_number"], a["state"]) for a in stack.attempts(run_id))
    assert tries == [(1, "up_for_retry"), (2, "failed")]
    second = stack.attempts(run_id)[-1]
    assert "try 2 failed on purpose" in (second["error"] or "")


def _sandbox_processes(uid_first: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
            except OSError:
                continue
            if uid_first <= uid < uid_first + 50:
                found.append(int(entry))
    return found


def test_kill_9_then_restart_leaves_no_orphan_and_no_stuck_attempt(stack: Stack) -> None:
    stack.start("supervisor", "supervisor")
    run_id = stack.trigger_when_parsed("slow")
    stack.wait_for(
        lambda: any(a["state"] == "running" for a in stack.attempts(run_id)), 60, "the task to run"
    )
    orphans = stack.wait_for(lambda: _sandbox_processes(140_000), 30, "its sandbox processes")
    stack.procs["supervisor"].kill()  # SIGKILL: no cleanup of any kind
    stack.procs["supervisor"].wait()
    stack.retire("supervisor", "supervisor-crashed")
    assert any(Path(f"/proc/{pid}").exists() for pid in orphans), (
        "the sandbox should outlive a SIGKILLed supervisor"
    )
    stack.start("supervisor", "supervisor")
    # The processes of that sandbox, not sandboxes in general: the new supervisor may well be
    # running new work (and pre-warmed sandboxes) by then.
    stack.wait_for(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in orphans) or None,
        30,
        "the restarted supervisor to kill the orphaned sandbox",
    )
    # The server takes the attempt back once the old session's heartbeats stop, and the
    # retry-less task fails; nothing stays "running".
    stack.wait_for(lambda: stack.run_state(run_id) == "failed", 120, "the lost attempt to end")
    states = [a["state"] for a in stack.attempts(run_id)]
    assert "running" not in states
    assert stack.stop("supervisor", timeout=60) == 0


def test_a_second_supervisor_on_the_same_state_dir_stops_in_one_line(stack: Stack) -> None:
    """It would kill the first one's sandboxes as orphans and tell the server that all the
    supervisor held had died: it must not get that far."""
    stack.start("supervisor", "supervisor")
    stack.wait_for(lambda: "started" in stack.output("supervisor") or None, 60, "the first")
    second = stack.runner("supervisor")
    assert second.returncode == 1, second.stderr
    (line,) = second.stderr.strip().splitlines()
    first = stack.procs["supervisor"].pid
    assert f"another supervisor (process {first}) already runs on" in line, line
    assert "core.state_dir" in line
    assert stack.procs["supervisor"].poll() is None  # the first is untouched
    assert stack.stop("supervisor", timeout=60) == 0


def test_sigterm_drains_running_work(stack: Stack) -> None:
    """SIGTERM: no new claims; the short task finishes inside the grace period, the long one
    is killed at its end and reported; the supervisor exits 0 and leaves no sandbox."""
    stack.start("supervisor", "supervisor")
    long_run = stack.trigger_when_parsed("slow")
    short = stack.operator("POST", "/v1/operator/workflows/slow/runs", {"conf": {"seconds": 1}})
    short_run = short.json()["id"]
    stack.wait_for(lambda: len(_sandbox_processes(140_000)) >= 2, 60, "both sandboxes")
    started = time.monotonic()
    assert stack.stop("supervisor", signal.SIGTERM, timeout=60) == 0
    assert time.monotonic() - started < 20  # the 3 s grace, not the 30 s nap
    leftover = _sandbox_processes(140_000)
    if leftover:  # say what it is before failing
        info = {
            p: Path(f"/proc/{p}/cmdline").read_bytes()[:200]
            for p in leftover
            if Path(f"/proc/{p}").exists()
        }
        time.sleep(3)
        assert not _sandbox_processes(140_000), info
    assert stack.run_state(short_run) == "success"
    assert stack.run_state(long_run) == "failed"


PINNED = textwrap.dedent("""
    import time
    from privsep.client import Context, Workflow

    VERSION = "{version}"
    wf = Workflow("pinned", schedule=None)

    @wf.task
    def first(ctx: Context) -> None:
        time.sleep(float(ctx.params.get("sleep", 0)))

    @wf.task(upstream=[first])
    def second(ctx: Context) -> str:
        print("running code version", VERSION)
        return VERSION
""")


def test_a_run_keeps_the_code_it_was_parsed_from(stack: Stack) -> None:
    path = stack.home / "workflows" / "pinned.py"
    path.write_text(PINNED.format(version="v1"))
    stack.start("supervisor", "supervisor")
    stack.trigger_when_parsed("pinned")  # v1 is parsed (a first run to be sure)
    resp = stack.operator("POST", "/v1/operator/workflows/pinned/runs", {"conf": {"sleep": 4}})
    old_run = resp.json()["id"]
    stack.wait_for(
        lambda: any(a["state"] == "running" for a in stack.attempts(old_run)),
        60,
        "the slow first task to start",
    )
    path.write_text(PINNED.format(version="v2"))  # edited while the run is in flight
    stack.wait_for(lambda: stack.run_state(old_run) == "success", 90, "the old run")
    second = next(a for a in stack.attempts(old_run) if a["task_id"] == "second")
    assert "running code version v1" in stack.runner("logs", second["id"]).stdout

    def new_version_runs() -> str | None:
        run = stack.operator("POST", "/v1/operator/workflows/pinned/runs", {"conf": {}}).json()
        stack.wait_for(lambda: stack.run_state(run["id"]) == "success", 60, "a new run")
        task = next(a for a in stack.attempts(run["id"]) if a["task_id"] == "second")
        out = stack.runner("logs", task["id"]).stdout
        return out if "version v2" in out else None

    stack.wait_for(new_version_runs, 60, "new runs to use the edited file")
