"""The supervisor loop turned by hand: its chores, its wait and its signals, without sleeping.

gunicorn's arbiter tests script the clock and the signal queue instead of waiting for them;
these do the same with :meth:`Supervisor.run_once`, so a timer that the pass runs but the wait
ignores (or the other way round) shows here, not as a supervisor that spins or dozes.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from privsep.runner.supervisor import daemon
from privsep.runner.supervisor.daemon import NEVER, Chore, Supervisor
from privsep.runner.supervisor.settings import RELOADABLE, SupervisorSettings


def _settings(tmp_path: Path) -> SupervisorSettings:
    return SupervisorSettings(
        name="loop",
        server_urls=("http://127.0.0.1:1",),
        credential=str(tmp_path / "cred"),
        state_dir=tmp_path / "state",
        runtime_dir=tmp_path / "run",
        workflows_dir=tmp_path / "wf",
        parallelism=2,
        heartbeat_interval=30.0,
        drain_grace=60.0,
        log_retention_days=0.0,
        discovery=False,
        discovery_interval=30.0,
        task_timeout=60.0,
        parse_timeout=60.0,
        trigger_timeout=60.0,
        network="none",
        launch_mode="exec",
        uid_first=170_000,
        uid_count=4,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(daemon.time, "monotonic", c)
    return c


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Supervisor]:
    s = Supervisor(None, _settings(tmp_path))  # type: ignore[arg-type]
    yield s
    s._waker.close()
    s._cleaner.shutdown()


def test_a_pass_runs_the_due_chores_and_waits_for_the_next_one(
    sup: Supervisor, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []
    waits: list[float] = []
    due = {"now": clock.now, "soon": clock.now + 0.1, "idle": NEVER}

    def run(name: str) -> None:
        ran.append(name)
        due[name] = NEVER  # done: not due again until it says so

    sup._chores = tuple(
        Chore(name, lambda name=name: due[name], lambda name=name: run(name)) for name in due
    )
    monkeypatch.setattr(sup._waker, "wait", waits.append)
    sup.run_once()
    assert ran == ["now"]
    assert waits == [pytest.approx(0.1)]


def test_the_wait_is_capped_when_nothing_is_due(sup: Supervisor, clock: Clock) -> None:
    sup._chores = (Chore("idle", lambda: NEVER, lambda: None),)
    assert sup._wait_time() == pytest.approx(daemon.LOOP_MAX_WAIT)


def test_an_overdue_chore_means_no_wait(sup: Supervisor, clock: Clock) -> None:
    sup._chores = (Chore("late", lambda: clock.now - 5, lambda: None),)
    assert sup._wait_time() == 0.0


def test_every_chore_of_a_fresh_supervisor_is_waited_for(sup: Supervisor, clock: Clock) -> None:
    # Heartbeat, retention, health and claim start due: the first pass does them, no wait.
    assert sup._wait_time() == 0.0
    names = [c.name for c in sup._chores]
    assert len(names) == len(set(names))
    assert {"heartbeat", "claim", "drain", "refresh", "outcomes", "health"} <= set(names)


def test_sigterm_drains_and_a_second_sigint_stops_at_once(sup: Supervisor, clock: Clock) -> None:
    sup._on_signal(signal.SIGTERM, None)
    sup._dispatch_signals()
    assert sup.draining
    assert sup._drain_deadline == clock.now + sup.settings.drain_grace
    assert sup._claim_due() == NEVER  # no new claims while draining
    assert sup._drain_due() == 0.0  # nothing running: stop on this pass
    sup._on_signal(signal.SIGTERM, None)
    sup._dispatch_signals()
    assert sup._drain_deadline == clock.now + sup.settings.drain_grace  # a repeat changes nothing
    sup._on_signal(signal.SIGINT, None)
    sup._dispatch_signals()
    assert sup._drain_deadline == 0


def test_the_drain_chore_stops_the_loop_once_nothing_runs(sup: Supervisor, clock: Clock) -> None:
    sup.handle_term()
    for chore in sup._chores:
        if chore.name == "drain" and clock.now >= chore.due():
            chore.run()
    assert sup.stopped


def test_the_signal_handler_only_enqueues(sup: Supervisor) -> None:
    sup._on_signal(signal.SIGHUP, None)
    assert not sup.draining and sup._signals.qsize() == 1


def test_sighup_changes_only_what_may_change_under_a_running_supervisor(
    sup: Supervisor, tmp_path: Path
) -> None:
    new = _settings(tmp_path)
    new.parallelism = 7
    new.network = "host"
    new.uid_first = 1
    sup.settings.reload_from(new)
    assert sup.settings.parallelism == 7 and sup.settings.network == "host"
    assert sup.settings.uid_first == 170_000  # the uid pool is made once, at start
    assert "uid_first" not in RELOADABLE and "backend" not in RELOADABLE
