"""The supervisor's lifecycle (issue 5), with real processes only.

Token refresh during a long task and none after it; ``kill -9`` of the server mid-task;
``--daemon``; SIGHUP re-reading the configuration; the sequential executor; ``runner logs
--follow``; log retention. Each test gets its own installation in a short home under /tmp (a
unix socket address holds at most 107 bytes) and the sandbox uids 160000..160049.

What the API does not list (audit events, XComs) is read from the metadata database itself,
``state/privsep.db``, with ``sqlite3``: tokens never leave the processes that hold them.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from stack import Stack, short_home

UID_FIRST = 160_000

LONG = textwrap.dedent("""
    import time
    from privsep.client import Context, Workflow

    wf = Workflow("long", schedule=None)

    @wf.task
    def long_task(ctx: Context) -> str:
        ctx.xcom_push("early", ctx.try_number)
        deadline = time.monotonic() + float(ctx.params.get("seconds", 12))
        while time.monotonic() < deadline:
            time.sleep(0.2)
        # Long past the first token's lifetime: works only if the supervisor refreshed it.
        ctx.xcom_push("late", "still authorized")
        return "done"
""")

NAP = textwrap.dedent("""
    import time
    from privsep.client import Context, Workflow

    wf = Workflow("nap", schedule=None)

    @wf.task(retries=0)
    def nap(ctx: Context) -> str:
        print(f"napping, try {ctx.try_number}", flush=True)
        time.sleep(float(ctx.params.get("seconds", 1)))
        return "rested"
""")

PAIR = textwrap.dedent("""
    import time
    from privsep.client import Context, Workflow

    wf = Workflow("pair", schedule=None)

    @wf.task
    def left(ctx: Context) -> None:
        time.sleep(2)

    @wf.task
    def right(ctx: Context) -> None:
        time.sleep(2)
""")

TRIO = textwrap.dedent("""
    import time
    from privsep.client import Context, Workflow

    wf = Workflow("trio", schedule=None)

    @wf.task
    def one(ctx: Context) -> None:
        time.sleep(2)

    @wf.task
    def two(ctx: Context) -> None:
        time.sleep(2)

    @wf.task
    def three(ctx: Context) -> None:
        time.sleep(2)
""")

CHATTY = textwrap.dedent("""
    import time
    from privsep.client import Context, Workflow

    wf = Workflow("chatty", schedule=None)

    @wf.task
    def chatty(ctx: Context) -> None:
        for i in range(12):
            print(f"tick {i}", flush=True)
            time.sleep(0.5)
""")


@pytest.fixture(scope="module")
def template_home() -> Iterator[Path]:
    """A home set up once through the real CLI (keys, database, credentials, registration),
    copied for each test: the set-up commands cost several seconds on a loaded machine."""
    home = short_home("pl-")
    Stack(home, uid_first=UID_FIRST).setup()
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def make_stack(template_home: Path) -> Iterator[Callable[..., Stack]]:
    """``make_stack(workflows={name: source}, **env)``: an installation of its own with its
    server running (the supervisor is each test's business)."""
    made: list[Stack] = []

    def make(workflows: dict[str, str], **env: str) -> Stack:
        home = Path(tempfile.mkdtemp(prefix="pl-", dir="/tmp"))
        shutil.copytree(template_home, home, symlinks=True, dirs_exist_ok=True)
        home.chmod(0o700)
        stack = Stack(home, uid_first=UID_FIRST, PRIVSEP__SUPERVISOR__DRAIN_GRACE="2", **env)
        made.append(stack)
        for name, source in workflows.items():
            (home / "workflows" / f"{name}.py").write_text(source)
        stack.start_server()
        return stack

    yield make
    for stack in made:
        stack.stop_all()
        shutil.rmtree(stack.home, ignore_errors=True)


def _query(stack: Stack, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{stack.home / 'state' / 'privsep.db'}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, args).fetchall())
    finally:
        conn.close()


def _audit_count(stack: Stack, event: str, subject: str) -> int:
    rows = _query(
        stack, "SELECT count(*) FROM audit_log WHERE event = ? AND subject = ?", event, subject
    )
    return int(rows[0][0])


def _trigger(stack: Stack, workflow_id: str, conf: dict[str, Any], timeout: float = 60) -> str:
    def attempt() -> str | None:
        resp = stack.operator("POST", f"/v1/operator/workflows/{workflow_id}/runs", {"conf": conf})
        return str(resp.json()["id"]) if resp.status_code == 200 else None

    return str(stack.wait_for(attempt, timeout, f"workflow {workflow_id} to be parsed"))


def _finish(stack: Stack, run_id: str, timeout: float) -> str:
    stack.wait_for(
        lambda: stack.run_state(run_id) in ("success", "failed"), timeout, f"run {run_id} to end"
    )
    return stack.run_state(run_id)


def _running_attempt(stack: Stack, run_id: str, timeout: float = 60) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((a for a in stack.attempts(run_id) if a["state"] == "running"), None)

    found: dict[str, Any] = stack.wait_for(find, timeout, f"an attempt of {run_id} to run")
    return found


def _interval(attempt: dict[str, Any]) -> tuple[datetime, datetime]:
    return (
        datetime.fromisoformat(attempt["started_at"]),
        datetime.fromisoformat(attempt["ended_at"]),
    )


def _write_config(stack: Stack, text: str) -> None:
    path = stack.home / "privsep.toml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(textwrap.dedent(text))
    tmp.chmod(0o600)
    tmp.replace(path)


# --- tokens -----------------------------------------------------------------------------------


def test_token_is_refreshed_during_a_long_task_and_never_after_it(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack({"long": LONG}, PRIVSEP__SERVER__WORK_TOKEN_TTL="5")
    stack.start("supervisor", "supervisor")
    run_id = _trigger(stack, "long", {"seconds": 12})
    attempt = _running_attempt(stack, run_id)
    # Refreshed while it runs (at 50-80% of the 5 s life: the first within 4 s of the claim).
    stack.wait_for(
        lambda: (
            _audit_count(stack, "token_refreshed", attempt["id"]) >= 1
            and stack.run_state(run_id) == "running"
        ),
        15,
        "a token refresh while the task runs",
    )
    assert _finish(stack, run_id, 60) == "success", stack.attempts(run_id)
    # The call made 12 s in, on a token first issued for 5 s, went through.
    rows = _query(stack, "SELECT key, value FROM xcoms WHERE run_id = ?", run_id)
    xcoms = {key: value for key, value in rows}
    assert xcoms.get("late") == '"still authorized"', xcoms
    refreshed = _audit_count(stack, "token_refreshed", attempt["id"])
    assert refreshed >= 2, f"only {refreshed} refreshes in a 12 s task with 5 s tokens"
    # Nothing refreshes the token of an ended attempt: wait out more than a token lifetime.
    time.sleep(5.5)  # refreshes come at most 4 s (80% of 5 s) apart
    assert _audit_count(stack, "token_refreshed", attempt["id"]) == refreshed
    # ... and its credential socket is gone, so nothing could hand the old token out.
    assert not any((stack.home / "run" / "sandboxes").iterdir())
    assert "token refresh for task" not in stack.output("supervisor")  # none failed either


# --- crashes ----------------------------------------------------------------------------------


def _forget(stack: Stack, name: str) -> None:
    """Drop an ended process from the stack (wait_for would take its end for a failure),
    keeping its output under another name."""
    stack.procs.pop(name).wait()
    (stack.home / f"{name}.out").rename(stack.home / f"{name}-{time.monotonic_ns()}.out")


def _napping(stack: Stack, run_id: str) -> dict[str, Any]:
    """The running attempt of a nap run, once its task code has started (context fetched)."""
    attempt = _running_attempt(stack, run_id)
    log_file = stack.home / "state" / "logs" / f"task-{attempt['id']}.log"
    stack.wait_for(
        lambda: log_file.exists() and "napping" in log_file.read_text(), 30, "the nap to start"
    )
    return attempt


def _kill_server(stack: Stack) -> None:
    stack.procs["server"].kill()  # SIGKILL: no clean-up of any kind
    _forget(stack, "server")


def test_server_kill_9_mid_task_loses_nothing(make_stack: Callable[..., Stack]) -> None:
    """The server dies while a task runs and comes back on the same port: the supervisor rides
    it out (heartbeats, claims and token refreshes retry), the task finishes, and its outcome
    is recorded. The tokens live 5 s, shorter than the outage: the task's last call works only
    because the supervisor refreshed its token again once the server was back."""
    stack = make_stack({"nap": NAP}, PRIVSEP__SERVER__WORK_TOKEN_TTL="5")
    stack.start("supervisor", "supervisor")
    run_id = _trigger(stack, "nap", {"seconds": 14})
    attempt = _napping(stack, run_id)
    _kill_server(stack)
    time.sleep(3)  # plus the restart: the supervisor's calls fail meanwhile; the task naps on
    assert stack.procs["supervisor"].poll() is None
    stack.start_server()
    assert _finish(stack, run_id, 60) == "success", stack.attempts(run_id)
    [done] = stack.attempts(run_id)
    assert done["id"] == attempt["id"]
    assert _audit_count(stack, "token_refreshed", attempt["id"]) >= 1
    supervisor = stack.output("supervisor")
    assert "heartbeat failed" in supervisor  # it did notice the outage
    assert "not reported" not in supervisor  # the task reported its own success
    assert stack.stop("supervisor") == 0


def test_server_down_when_a_task_ends_its_outcome_still_reaches_the_server(
    make_stack: Callable[..., Stack],
) -> None:
    """Harder: the task ends while the server is still down (longer than the supervisor's
    first reporting attempts last). The attempt must not stay "running" for ever, and the
    task's code must not run again: its own report keeps being sent through the outage (the
    server applies a report once), so once the server is back the first try succeeds."""
    stack = make_stack({"nap": NAP.replace("retries=0", "retries=1")})
    stack.start("supervisor", "supervisor")
    run_id = _trigger(stack, "nap", {"seconds": 3})
    _napping(stack, run_id)
    _kill_server(stack)
    # The task ends ~3 s in and cannot report; nor can the supervisor until the server is
    # back, 9 s plus a restart later (longer than the supervisor once retried for).
    time.sleep(9)
    assert stack.procs["supervisor"].poll() is None
    stack.start_server()
    assert _finish(stack, run_id, 60) == "success", stack.attempts(run_id)
    # Try 1's own report was sent again until the server answered: one try, no re-run.
    tries = [(a["try_number"], a["state"]) for a in stack.attempts(run_id)]
    assert tries == [(1, "success")], stack.attempts(run_id)


# --- daemon mode and signals --------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_daemon_writes_its_pid_file_detaches_and_stops_on_sigterm(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack({"nap": NAP})
    state = stack.home / "state"
    pid_file = state / "supervisor.pid"
    launched = stack.runner("supervisor", "--daemon", timeout=30)
    assert launched.returncode == 0, launched.stderr  # the launcher returns at once
    pid = int(stack.wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 15, "pid"))
    try:
        assert _alive(pid)
        proc = psutil.Process(pid)
        assert proc.ppid() != os.getpid()  # not our child: the double fork detached it
        assert os.getsid(pid) != os.getsid(0)  # a session of its own
        assert proc.cwd() == "/"
        # It works: a run goes through the daemon.
        run_id = _trigger(stack, "nap", {"seconds": 0})
        assert _finish(stack, run_id, 60) == "success", stack.attempts(run_id)
        log = (state / "supervisor.log").read_text()
        assert "supervisor sup-test started" in log
        os.kill(pid, signal.SIGTERM)
        stack.wait_for(lambda: not _alive(pid), 30, "the daemon to exit on SIGTERM")
        stack.wait_for(lambda: not pid_file.exists(), 5, "the pid file to be removed")
        assert "draining" in (state / "supervisor.log").read_text()
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_sighup_rereads_the_configuration(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack({"trio": TRIO})
    del stack.env["PRIVSEP__SUPERVISOR__PARALLELISM"]  # the file decides
    _write_config(stack, "[supervisor]\nparallelism = 1\n")
    stack.start("supervisor", "supervisor")
    stack.wait_for(
        lambda: "parallelism 1" in stack.output("supervisor"), 30, "the supervisor to start"
    )
    _write_config(stack, "[supervisor]\nparallelism = 3\n")
    stack.procs["supervisor"].send_signal(signal.SIGHUP)
    stack.wait_for(
        lambda: "configuration reloaded (parallelism 3)" in stack.output("supervisor"),
        15,
        "the reload to be logged",
    )
    # And it acts on it: three 2 s tasks now run side by side.
    run_id = _trigger(stack, "trio", {})
    assert _finish(stack, run_id, 60) == "success"
    intervals = [_interval(a) for a in stack.attempts(run_id)]
    latest_start = max(start for start, _ in intervals)
    earliest_end = min(end for _, end in intervals)
    assert latest_start < earliest_end, f"the three tasks did not overlap: {intervals}"
    assert stack.procs["supervisor"].poll() is None
    assert stack.stop("supervisor") == 0


def test_sequential_executor_runs_one_item_at_a_time(make_stack: Callable[..., Stack]) -> None:
    # PRIVSEP__SUPERVISOR__PARALLELISM=2 stays set: the sequential executor overrides it.
    stack = make_stack({"pair": PAIR}, PRIVSEP__SUPERVISOR__EXECUTOR="sequential")
    stack.start("supervisor", "supervisor")
    run_id = _trigger(stack, "pair", {})
    assert _finish(stack, run_id, 60) == "success"
    first, second = sorted(_interval(a) for a in stack.attempts(run_id))
    assert first[1] <= second[0], f"the two tasks overlapped: {first} and {second}"
    assert "parallelism 1" in stack.output("supervisor")


# --- logs -------------------------------------------------------------------------------------


def test_logs_follow_shows_a_running_task_live_and_returns_when_it_ends(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack({"chatty": CHATTY})
    stack.start("supervisor", "supervisor")
    run_id = _trigger(stack, "chatty", {})
    attempt = _running_attempt(stack, run_id)
    log_file = stack.home / "state" / "logs" / f"task-{attempt['id']}.log"
    stack.wait_for(log_file.exists, 10, "the attempt's log file")
    follow = subprocess.Popen(
        [sys.executable, "-m", "privsep", "logs", attempt["id"], "--follow"],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    states_when_seen: dict[str, str] = {}

    def read() -> None:
        assert follow.stdout is not None
        for line in follow.stdout:
            lines.append(line)
            if "tick 3" in line:  # seen live: the task is still printing
                states_when_seen["tick 3"] = stack.run_state(run_id)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        stack.wait_for(lambda: "tick 3" in states_when_seen, 20, "tick 3 through --follow")
        assert states_when_seen["tick 3"] == "running"
        assert follow.poll() is None  # still following
        assert follow.wait(timeout=30) == 0  # returns on its own once the task has ended
        reader.join(timeout=5)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    text = "".join(lines)
    assert all(f"tick {i}\n" in text for i in range(12)), text
    assert _finish(stack, run_id, 30) == "success"


def test_log_retention_deletes_old_logs(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack({"nap": NAP})
    _write_config(stack, "[supervisor]\nlog_retention_days = 30\n")
    stack.start("supervisor", "supervisor")
    logs = stack.home / "state" / "logs"
    for _ in range(2):
        run_id = _trigger(stack, "nap", {"seconds": 0})
        assert _finish(stack, run_id, 60) == "success"
        # Retention never deletes a log the server does not hold all of yet, and the end of
        # a log is shipped up to an interval after its run ended: wait for the server's copy.
        attempt = stack.attempts(run_id)[0]["id"]
        stack.wait_for(
            lambda a=attempt: stack.operator("GET", f"/v1/operator/attempts/{a}/log").json()[
                "complete"
            ],
            30,
            f"the server to hold all of {attempt}'s log",
        )
    task_logs = sorted(logs.glob("task-*.log"))
    assert len(task_logs) == 2
    ancient, older = task_logs
    day = 86400
    os.utime(ancient, (time.time() - 40 * day,) * 2)
    os.utime(older, (time.time() - 10 * day,) * 2)
    marker = "configuration reloaded"

    def hup_and_wait(count: int) -> None:
        stack.procs["supervisor"].send_signal(signal.SIGHUP)
        stack.wait_for(
            lambda: stack.output("supervisor").count(marker) >= count, 15, f"reload {count}"
        )

    # Same 30-day retention, re-read: the 40-day-old log goes, the 10-day-old one stays.
    hup_and_wait(1)
    stack.wait_for(lambda: not ancient.exists(), 10, "the 40-day-old log to be deleted")
    assert older.exists()
    # Retention shortened to 5 days: the 10-day-old log goes; today's logs stay.
    _write_config(stack, "[supervisor]\nlog_retention_days = 5\n")
    hup_and_wait(2)
    stack.wait_for(lambda: not older.exists(), 10, "the 10-day-old log to be deleted")
    assert list(logs.glob("parse-*.log")), "a fresh log was deleted"
    # A restart applies it too.
    assert stack.stop("supervisor") == 0
    fresh = next(logs.glob("parse-*.log"))
    os.utime(fresh, (time.time() - 6 * day,) * 2)
    _forget(stack, "supervisor")
    stack.start("supervisor", "supervisor")
    stack.wait_for(lambda: not fresh.exists(), 30, "the restarted supervisor to apply retention")


def test_sigterm_stops_a_supervisor_still_waiting_for_its_server(
    make_stack: Callable[..., Stack],
) -> None:
    """Start-up retries the server with backoff; SIGTERM must end that wait at once, or
    ``systemctl stop`` waits out TimeoutStopSec and SIGKILLs it."""
    stack = make_stack({"nap": NAP})
    stack.stop("server")
    del stack.procs["server"]  # gone on purpose: its exit is no failure here
    sup = stack.start("supervisor", "supervisor")
    stack.wait_for(
        lambda: "cannot open a session" in stack.output("supervisor"), 30, "a failed session"
    )
    started = time.monotonic()
    sup.send_signal(signal.SIGTERM)
    rc = sup.wait(timeout=30)
    took = time.monotonic() - started
    out = stack.output("supervisor")
    assert rc != 0 and took < 10, (rc, took, out)
    assert "stopped before a session with the server could be opened" in out
    assert "Traceback" not in out
