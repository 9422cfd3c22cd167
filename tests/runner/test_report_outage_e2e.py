"""A database outage while tasks report their outcome: each task's code still runs once.

Real processes throughout: PostgreSQL, ``runner server``, a supervisor and its sandboxes. The
tasks write a marker line and wait for a gate; once all of them run, PostgreSQL is stopped at
once (``pg_ctl stop -m immediate``) and the gate opened, so every task's ``succeed`` meets the
outage: a 503 from the server, passed back through the supervisor. The sandboxes keep sending
their reports (an outcome report is retried across an outage, and the server answers a repeat
with the first answer), PostgreSQL comes back, and the run ends with every task run once, in
one try. Before reports were retried, each of these tasks failed its try and ran again.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack import Stack, short_home
from test_failover_e2e import GATED, assert_each_task_ran_once, markers, postgres, workflow

from server.postgres import PostgresCluster

__all__ = ["postgres"]  # the module-scoped cluster fixture, shared with the failover tests


@pytest.fixture
def stack(postgres: PostgresCluster) -> Iterator[Stack]:
    database = postgres.create_database()
    home = short_home("pro-")
    stack = Stack(
        home,
        uid_first=211_000,
        PRIVSEP__DATABASE__URL=postgres.url(database),
        PRIVSEP__SUPERVISOR__PARALLELISM=str(GATED),
    )
    stack.setup()
    try:
        yield stack
    finally:
        stack.stop_all()
        shutil.rmtree(home, ignore_errors=True)
        postgres.drop_database(database)


def _retrying_reports(stack: Stack) -> int:
    """Sandboxes whose log says their report is being tried again."""
    logs = (stack.home / "state" / "logs").glob("task-*.log")
    return sum("POST /v1/task/succeed" in log.read_text(errors="replace") for log in logs)


@pytest.mark.slow
def test_reports_sent_during_a_database_outage_run_no_task_twice(
    stack: Stack, postgres: PostgresCluster
) -> None:
    gate: Path = stack.home / "workflows" / "gate"
    (stack.home / "workflows" / "failover.py").write_text(workflow(gate))
    stack.start_server()
    stack.start("supervisor", "supervisor")
    run_id = stack.trigger_when_parsed("failover")

    def all_gated_running() -> bool:
        states = [a["state"] for a in stack.attempts(run_id) if a["task_id"] != "after"]
        return states == ["running"] * GATED and len(markers(stack)) == GATED

    stack.wait_for(all_gated_running, 120, f"{GATED} gated tasks to be running")
    postgres.crash()
    try:
        gate.write_text("open\n")
        gate.chmod(0o644)
        stack.wait_for(
            lambda: _retrying_reports(stack) == GATED, 60, "every task's report to meet the outage"
        )
    finally:
        postgres.restart()
    stack.wait_for(lambda: stack.run_state(run_id) == "success", 180, "the run to succeed")
    assert_each_task_ran_once(stack, run_id)
