"""Central logs end to end: a real server, a real supervisor, tasks in real sandboxes.

The claim each test checks is that the server's copy of an attempt's log equals the node-local
file byte for byte (nothing lost, nothing twice), across a supervisor killed with SIGKILL
mid-task and restarted, and across a server stopped while a task prints and started again;
that ``runner logs --follow`` from a second home holding nothing but the operator credential
shows a running task's lines before it ends and returns when it is complete; and that a
deferred task resumed keeps one log with both parts in order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from stack import Stack, free_port, running_stack, short_home

CHATTY = textwrap.dedent("""
    import time
    from privsep.client import Context, Workflow

    wf = Workflow("chatty", schedule=None)

    @wf.task(retries=0)
    def talk(ctx: Context) -> int:
        n = int(ctx.params.get("n", 20))
        for i in range(n):
            print(f"line {i} " + "x" * (i % 50), flush=True)
            time.sleep(float(ctx.params.get("dt", 0.05)))
        return n
""")

TWICE = textwrap.dedent("""
    from privsep.client import Context, Trigger, TriggerEvent, Workflow

    wf = Workflow("twice", schedule=None)

    class Nap(Trigger):
        def __init__(self, seconds: float):
            self.seconds = seconds

        async def run(self):
            import asyncio

            await asyncio.sleep(self.seconds)
            yield TriggerEvent({"slept": self.seconds})

    @wf.task
    def park(ctx: Context):
        if ctx.trigger_event is None:
            print("part one: before the deferral", flush=True)
            print("no newline at the end", end="", flush=True)
            return ctx.defer(Nap(0.5))
        print("part two: after the resumption", flush=True)
        return ctx.trigger_event.payload["slept"]
""")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    metrics = f"127.0.0.1:{free_port()}"
    with running_stack("lg-", uid_first=241_000, PRIVSEP__SUPERVISOR__METRICS_BIND=metrics) as s:
        (s.home / "workflows" / "chatty.py").write_text(CHATTY)
        (s.home / "workflows" / "twice.py").write_text(TWICE)
        s.env["TEST_METRICS_URL"] = f"http://{metrics}/metrics"
        yield s


def _supervise(stack: Stack) -> None:
    """The server and a supervisor running (a test before may have stopped either)."""
    server = stack.procs.get("server")
    if server is None or server.poll() is not None:
        stack.start_server()
    sup = stack.procs.get("supervisor")
    if sup is None or sup.poll() is not None:
        stack.start("supervisor", "supervisor")


def _run(stack: Stack, workflow: str, conf: dict[str, Any]) -> tuple[str, str]:
    """Trigger a run once the workflow is parsed; its run id and its (first) attempt id."""

    def started() -> str | None:
        resp = stack.operator("POST", f"/v1/operator/workflows/{workflow}/runs", {"conf": conf})
        return str(resp.json()["id"]) if resp.status_code == 200 else None

    run_id = str(stack.wait_for(started, 90, f"workflow {workflow} to be parsed"))
    attempts = stack.wait_for(lambda: stack.attempts(run_id), 30, "the attempt")
    return run_id, str(attempts[0]["id"])


def _page(stack: Stack, attempt: str, after: int = 0) -> dict[str, Any]:
    resp = stack.operator("GET", f"/v1/operator/attempts/{attempt}/log?after={after}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def _server_log(stack: Stack, attempt: str) -> tuple[str, bool]:
    """The whole central log and whether it is complete."""
    text, after = [], 0
    while True:
        page = _page(stack, attempt, after)
        text += [c["text"] for c in page["chunks"]]
        if not page["chunks"]:
            return "".join(text), bool(page["complete"])
        after = page["next"]


def _complete_log(stack: Stack, attempt: str, timeout: float = 60) -> str:
    def complete() -> str | None:
        text, done = _server_log(stack, attempt)
        return text if done else None

    return str(stack.wait_for(complete, timeout, f"the central log of {attempt} to be complete"))


def _local(stack: Stack, attempt: str) -> bytes:
    return (stack.home / "state" / "logs" / f"task-{attempt}.log").read_bytes()


def _metrics(stack: Stack) -> dict[str, float]:
    text = requests.get(stack.env["TEST_METRICS_URL"], timeout=5).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_supervisor_killed_mid_task_ships_the_rest_after_its_restart(stack: Stack) -> None:
    _supervise(stack)
    run_id, attempt = _run(stack, "chatty", {"n": 400, "dt": 0.02})
    stack.wait_for(lambda: _page(stack, attempt)["chunks"], 60, "the first lines on the server")
    stack.stop("supervisor", signal.SIGKILL)
    stack.retire("supervisor", "supervisor-crashed")
    stack.start("supervisor", "supervisor")
    server = _complete_log(stack, attempt)
    local = _local(stack, attempt)
    assert server.encode() == local
    assert local.startswith(b"line 0 \nline 1 x\n")
    assert "shipping the rest of 1 logs from before the restart" in stack.output("supervisor")
    # Taken back as orphaned by the restart: failed (no retries), its log complete anyway.
    stack.wait_for(lambda: stack.run_state(run_id) == "failed", 30, "the run to fail")


def test_a_server_outage_loses_nothing_and_shows_nothing_twice(stack: Stack) -> None:
    _supervise(stack)
    run_id, attempt = _run(stack, "chatty", {"n": 250, "dt": 0.03})
    stack.wait_for(lambda: _page(stack, attempt)["chunks"], 60, "the first lines on the server")
    stack.stop("server")
    del stack.procs["server"]  # stopped on purpose: the stack's waits must not mind
    path = stack.home / "state" / "logs" / f"task-{attempt}.log"
    size = path.stat().st_size
    # While the server is away the node-local copy grows, and the lag metric says so.
    stack.wait_for(lambda: path.stat().st_size > size + 2000, 30, "output during the outage")
    seen = stack.wait_for(
        lambda: (m := _metrics(stack))["privsep_supervisor_log_pending_bytes"] > 0 and m,
        10,
        "pending bytes in the supervisor's metrics",
    )
    assert seen["privsep_supervisor_log_shipping_lag_seconds"] > 0
    stack.start_server()
    server = _complete_log(stack, attempt)
    assert server.encode() == _local(stack, attempt)
    assert [f"line {i} " in server for i in range(250)] == [True] * 250
    stack.wait_for(lambda: stack.run_state(run_id) == "success", 60, "the run")
    after = stack.wait_for(
        lambda: (m := _metrics(stack))["privsep_supervisor_log_pending_bytes"] == 0 and m,
        10,
        "nothing pending",
    )
    assert after["privsep_supervisor_log_shipping_lag_seconds"] == 0
    assert after["privsep_supervisor_log_shipped_bytes_total"] >= len(server.encode())


@pytest.fixture
def operator_home(stack: Stack) -> Iterator[dict[str, str]]:
    """A second home that holds only the operator credential: no supervisor key, no state,
    no database; it knows the server's URL and nothing else."""
    home = short_home("lgop-")
    (home / "credentials").mkdir(mode=0o700)
    shutil.copy(stack.home / "credentials" / "operator.key", home / "credentials" / "operator.key")
    os.chmod(home / "credentials" / "operator.key", 0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVSEP")}
    env.update({"PRIVSEP_HOME": str(home), "PRIVSEP__SERVER__URL": stack.url})
    try:
        yield env
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _runner(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "privsep", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_logs_follow_from_a_home_with_only_the_operator_credential(
    stack: Stack, operator_home: dict[str, str]
) -> None:
    _supervise(stack)
    run_id, attempt = _run(stack, "chatty", {"n": 120, "dt": 0.05})
    follow = subprocess.Popen(
        [sys.executable, "-m", "privsep", "logs", attempt, "--follow"],
        env=operator_home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    state_when_seen: dict[str, str] = {}

    def read() -> None:
        assert follow.stdout is not None
        for line in follow.stdout:
            lines.append(line)
            if line.startswith("line 5 "):  # seen live: the task is still printing
                state_when_seen["line 5"] = stack.run_state(run_id)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        stack.wait_for(lambda: "line 5" in state_when_seen, 30, "line 5 through --follow")
        assert state_when_seen["line 5"] == "running"
        assert follow.wait(timeout=60) == 0  # returns on its own once the log is complete
        reader.join(timeout=5)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert stack.run_state(run_id) == "success"
    assert "".join(lines).encode() == _local(stack, attempt)
    assert not (Path(operator_home["PRIVSEP_HOME"]) / "state").exists()
    # --json: one chunk per line, the same text.
    done = _runner(operator_home, "logs", attempt, "--json")
    assert done.returncode == 0, done.stderr
    chunks = [json.loads(line) for line in done.stdout.splitlines()]
    assert [sorted(c) for c in chunks] == [["seq", "text"]] * len(chunks)
    assert "".join(c["text"] for c in chunks).encode() == _local(stack, attempt)
    # An id the server does not know: one line, exit 1.
    missing = _runner(operator_home, "logs", "no-such-attempt")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == (
        "runner: cannot show the log of no-such-attempt: no attempt or log 'no-such-attempt'\n"
    )


def test_a_deferred_and_resumed_task_keeps_one_log_in_order(stack: Stack) -> None:
    _supervise(stack)
    run_id, attempt = _run(stack, "twice", {})
    stack.wait_for(lambda: stack.run_state(run_id) == "success", 90, "the run")
    server = _complete_log(stack, attempt)
    assert server.encode() == _local(stack, attempt)
    one = server.index("part one: before the deferral\n")
    unended = server.index("no newline at the end")
    cut = server.index("\n[privsep: resumed at ")  # the first part's last line ended first
    two = server.index("part two: after the resumption\n")
    assert one < unended < cut < two
    assert server.count("[privsep: resumed at ") == 1
    # What `runner logs` prints on the supervisor's own host is the same log.
    shown = stack.runner("logs", attempt)
    assert shown.returncode == 0 and shown.stdout == server
