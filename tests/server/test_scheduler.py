"""The scheduler against a real database (SQLite and PostgreSQL), under a controlled clock.

Every scheduler function takes ``now``, so these tests walk schedules tick by tick without
sleeping. Races between replicas are real: several threads, each with its own engine (its own
connections, as separate server processes would have), released together by a barrier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from privsep.server.db import Database, upgrade
from privsep.server.db.models import (
    AttemptState,
    AuditLog,
    Run,
    RunState,
    RunTriggerKind,
    TaskAttempt,
    Trigger,
    TriggerState,
    Workflow,
    WorkflowVersion,
)
from privsep.server.scheduler import (
    CronSchedule,
    DueRun,
    IntervalSchedule,
    InvalidSchedule,
    SchedulerThread,
    create_scheduled_run,
    create_scheduled_runs,
    due_runs,
    expire_deferrals,
    expire_running,
    parse_schedule,
    scheduler_pass,
)
from privsep.server.scheduler.facts import cache as version_facts
from privsep.server.scheduler.timeouts import _expire_running
from privsep.server.schemas import WorkflowDefinition
from privsep.server.services.parse_results import store_definition

from .api import ApiHarness, task, workflow
from .scheduler_kit import (
    T0,
    _fresh_version_cache,  # noqa: F401 - autouse: each test starts without the cache
    add_version,
    at,
    attempts,
    defer,
    definition,
    logical_dates,
    make_workflow,
    manual_run,
    race,
    scheduled_runs,
    set_attempt,
)

# --- schedules, without a database -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "after", "expected"),
    [
        ("@hourly", at(10, 17), at(11)),
        ("@daily", at(10, 17), datetime(2024, 3, 6, tzinfo=UTC)),
        ("@midnight", at(10, 17), datetime(2024, 3, 6, tzinfo=UTC)),
        ("@weekly", at(10, 17), datetime(2024, 3, 10, tzinfo=UTC)),  # the next Sunday
        ("@monthly", at(10, 17), datetime(2024, 4, 1, tzinfo=UTC)),
        ("@yearly", at(10, 17), datetime(2025, 1, 1, tzinfo=UTC)),
        ("@annually", at(10, 17), datetime(2025, 1, 1, tzinfo=UTC)),
        ("@HOURLY", at(10, 17), at(11)),
        ("*/15 * * * *", at(10, 17), at(10, 30)),
        ("*/15  *  * * *", at(10, 30), at(10, 45)),  # strictly after, extra spaces fine
        ("30 * * * * 15", at(10, 17), at(10, 30, 15)),  # six fields: seconds
        (90, at(10, 17), at(10, 18, 30)),
        (0.5, at(10, 17), at(10, 17, 0, 500_000)),
    ],
)
def test_schedules_name_their_next_tick(
    value: str | float, after: datetime, expected: datetime
) -> None:
    schedule = parse_schedule(value)
    assert schedule is not None
    assert schedule.next_after(after) == expected


@pytest.mark.parametrize(
    "value", ["@reboot", "@every_minute", "not cron", "61 * * * *", "", 0, -5.0, float("inf"), True]
)
def test_invalid_schedules_are_refused(value: Any) -> None:
    with pytest.raises(InvalidSchedule):
        parse_schedule(value)


def test_no_schedule_is_none() -> None:
    assert parse_schedule(None) is None


def test_latest_tick_is_inclusive_of_now_and_exclusive_of_the_base() -> None:
    hourly = CronSchedule("0 * * * *")
    assert hourly.latest_between(at(10), at(10)) is None  # the base itself is not a tick
    assert hourly.latest_between(at(10), at(10, 59, 59, 999_999)) is None
    assert hourly.latest_between(at(10), at(11)) == at(11)
    assert hourly.latest_between(at(10), at(11, 0, 0, 1)) == at(11)
    assert hourly.latest_between(at(10), at(14, 30)) == at(14)
    every = IntervalSchedule(0.1)  # not exact in binary floating point
    base = at(10)
    assert every.latest_between(base, base + timedelta(milliseconds=99)) is None
    assert every.latest_between(base, base + timedelta(milliseconds=100)) == base + timedelta(
        milliseconds=100
    )
    assert every.latest_between(base, base + timedelta(seconds=3)) == base + timedelta(seconds=3)


# --- scheduled runs -----------------------------------------------------------------------------


def test_cron_workflow_fires_exactly_on_its_tick(db: Database) -> None:
    version = make_workflow(db, "cron", "30 * * * *", task("a"), task("b", "a"))
    assert create_scheduled_runs(db, at(10, 29, 59, 999_999)) == 0
    assert scheduled_runs(db) == []
    assert create_scheduled_runs(db, at(10, 30)) == 1
    (run,) = scheduled_runs(db)
    assert run.logical_date == at(10, 30)
    assert run.workflow_version_id == version
    assert run.state == RunState.RUNNING and run.trigger_kind == RunTriggerKind.SCHEDULE
    # Started: the root task is queued, its downstream waits for it.
    assert [(a.task_id, a.state) for a in attempts(db, run.id)] == [("a", AttemptState.QUEUED)]
    # Once per tick, however often the scheduler looks.
    for moment in (at(10, 30), at(10, 30, 0, 1), at(10, 45), at(11, 29, 59, 999_999)):
        assert create_scheduled_runs(db, moment) == 0
    assert create_scheduled_runs(db, at(11, 30)) == 1
    assert logical_dates(db) == [at(10, 30), at(11, 30)]


def test_a_version_the_parse_route_stored_is_parsed_once_then_cached(db: Database) -> None:
    wf = WorkflowDefinition.model_validate(definition("stored", "@hourly"))
    with db.write_session() as session:
        store_definition(session, wf, "file:///w/stored.py#sha256=" + "0" * 64, "")
    with db.read_session() as session:
        content_hash = session.scalar(
            select(WorkflowVersion.content_hash).where(WorkflowVersion.workflow_id == "stored")
        )
    assert content_hash is not None and content_hash not in version_facts
    # The workflow row was made now, by the route: its first tick is in the future.
    assert create_scheduled_runs(db, datetime.now(UTC) + timedelta(hours=2)) == 1
    assert content_hash in version_facts  # the next passes do not load and parse it again


def test_a_version_whose_hash_does_not_match_is_never_cached(db: Database) -> None:
    make_workflow(db, "handmade", "@hourly")
    with db.write_session() as session:
        session.execute(
            update(WorkflowVersion)
            .where(WorkflowVersion.workflow_id == "handmade")
            .values(content_hash="not-the-digest")
        )
    assert create_scheduled_runs(db, at(11)) == 1
    assert "not-the-digest" not in version_facts
    assert create_scheduled_runs(db, at(12)) == 1  # still scheduled, parsed every time


def test_hourly_preset(db: Database) -> None:
    make_workflow(db, "hourly", "@hourly")
    assert create_scheduled_runs(db, at(10, 59)) == 0
    assert create_scheduled_runs(db, at(11, 0, 0, 300)) == 1
    assert create_scheduled_runs(db, at(11, 59, 59)) == 0
    assert create_scheduled_runs(db, at(12)) == 1
    assert logical_dates(db) == [at(11), at(12)]


def test_interval_schedule_stays_anchored(db: Database) -> None:
    make_workflow(db, "every90", 90.0)
    assert create_scheduled_runs(db, T0 + timedelta(seconds=89.999)) == 0
    assert create_scheduled_runs(db, T0 + timedelta(seconds=90)) == 1
    assert create_scheduled_runs(db, T0 + timedelta(seconds=179)) == 0
    # A late pass does not shift later ticks: they stay at T0 + k x 90 s.
    assert create_scheduled_runs(db, T0 + timedelta(seconds=200)) == 1
    assert create_scheduled_runs(db, T0 + timedelta(seconds=269)) == 0
    assert create_scheduled_runs(db, T0 + timedelta(seconds=270)) == 1
    assert logical_dates(db) == [T0 + timedelta(seconds=s) for s in (90, 180, 270)]


def test_integer_seconds_are_an_interval(db: Database) -> None:
    make_workflow(db, "every60", 60)
    assert create_scheduled_runs(db, T0 + timedelta(seconds=60)) == 1


def test_missed_ticks_create_only_the_latest(db: Database) -> None:
    make_workflow(db, "hourly", "@hourly")
    with db.read_session() as session:
        (due,) = due_runs(session, at(15, 20))
    assert due.logical_date == at(15) and due.skipped_ticks
    assert create_scheduled_runs(db, at(15, 20)) == 1
    assert logical_dates(db) == [at(15)]
    assert create_scheduled_runs(db, at(15, 59)) == 0
    assert create_scheduled_runs(db, at(16)) == 1
    with db.read_session() as session:
        assert due_runs(session, at(17)) == [
            DueRun("hourly", due.version_id, at(17), skipped_ticks=False)
        ]


def test_deactivated_and_unscheduled_workflows_do_not_fire(db: Database) -> None:
    make_workflow(db, "off", "@hourly", active=False)
    make_workflow(db, "manual_only", None)
    assert create_scheduled_runs(db, at(23)) == 0
    # Reactivated: it fires for its latest missed tick only (no catch-up), then on schedule.
    with db.write_session() as session:
        session.execute(update(Workflow).where(Workflow.id == "off").values(active=True))
    assert create_scheduled_runs(db, at(23, 5)) == 1
    assert logical_dates(db) == [at(23)]


def test_a_bad_schedule_does_not_stop_the_others(db: Database, caplog: Any) -> None:
    make_workflow(db, "broken", "every tuesday")
    make_workflow(db, "fine", "@hourly")
    assert create_scheduled_runs(db, at(11)) == 1
    assert [r.workflow_id for r in scheduled_runs(db)] == ["fine"]
    assert "broken" in caplog.text and "not a valid cron expression" in caplog.text


def test_manual_runs_do_not_move_the_schedule(db: Database) -> None:
    make_workflow(db, "both", "@hourly")
    manual_run(db, "both")
    assert create_scheduled_runs(db, at(11)) == 1
    assert logical_dates(db) == [at(11)]


def test_runs_pin_the_version_current_when_they_are_created(db: Database) -> None:
    first = make_workflow(db, "evolving", "@hourly")
    assert create_scheduled_runs(db, at(11)) == 1
    second = add_version(db, definition("evolving", "@hourly", task("x"), task("y")), "v2")
    assert create_scheduled_runs(db, at(12)) == 1
    assert [r.workflow_version_id for r in scheduled_runs(db)] == [first, second]
    # A new version's schedule takes over from the last scheduled run.
    add_version(db, definition("evolving", 600.0), "v3")
    assert create_scheduled_runs(db, at(12, 9)) == 0
    assert create_scheduled_runs(db, at(12, 10)) == 1


def test_a_plan_from_before_a_version_change_creates_nothing(db: Database) -> None:
    make_workflow(db, "changing", "@hourly")
    with db.read_session() as session:
        (due,) = due_runs(session, at(11))
    add_version(db, definition("changing", "@daily"), "v2")
    assert create_scheduled_run(db, due) is None
    assert scheduled_runs(db) == []


def test_a_stale_plan_never_adds_an_older_tick(db: Database) -> None:
    make_workflow(db, "slow", "@hourly")
    with db.read_session() as session:
        (stale,) = due_runs(session, at(11, 30))
    assert create_scheduled_runs(db, at(12)) == 1
    assert create_scheduled_run(db, stale) is None
    assert logical_dates(db) == [at(12)]


def test_an_insert_that_loses_on_the_unique_constraint_is_not_an_error(db: Database) -> None:
    """What the losing replica sees on PostgreSQL: its check passed, the INSERT collides."""
    version = make_workflow(db, "taken", "@hourly")
    with db.write_session() as session:  # a run already holding (taken, 11:00)
        session.add(
            Run(
                workflow_id="taken",
                workflow_version_id=version,
                trigger_kind=RunTriggerKind.MANUAL,
                logical_date=at(11),
            )
        )
    assert create_scheduled_run(db, DueRun("taken", version, at(11))) is None
    with db.read_session() as session:
        assert session.scalar(select(func.count()).select_from(Run)) == 1
        assert session.scalar(select(func.count()).select_from(TaskAttempt)) == 0


def test_two_replicas_racing_on_a_tick_create_one_run(migrated_db_url: str) -> None:
    db = Database.from_url(migrated_db_url)
    try:
        for index in range(5):
            make_workflow(db, f"raced{index}", "*/5 * * * *")
        for tick in (at(10, 20), at(10, 25), at(10, 30)):
            created = race(migrated_db_url, 4, partial(create_scheduled_runs, now=tick))
            assert sum(created) == 5, created
            assert create_scheduled_runs(db, tick + timedelta(minutes=4, seconds=59)) == 0
        for index in range(5):
            assert logical_dates(db, f"raced{index}") == [at(10, 20), at(10, 25), at(10, 30)]
        # Both halves of the race apart: both replicas plan first, then both insert.
        with db.read_session() as session:
            plans = [due_runs(session, at(10, 35)) for _ in range(2)]
        assert plans[0] == plans[1] and len(plans[0]) == 5
        results = race(
            migrated_db_url, 2, lambda d: [create_scheduled_run(d, due) for due in plans.pop()]
        )
        made = [run_id for result in results for run_id in result if run_id is not None]
        assert len(made) == 5
        with db.read_session() as session:
            per_run = session.execute(
                select(TaskAttempt.run_id, func.count()).group_by(TaskAttempt.run_id)
            ).all()
        assert all(count == 1 for _, count in per_run) and len(per_run) == 20
    finally:
        db.dispose()


def test_scheduled_runs_are_claimable_through_the_api(db: Database, tmp_path: Path) -> None:
    api = ApiHarness(db, tmp_path)
    try:
        api.register_supervisor("sup")
        sess = api.supervisor_session("sup")
        api.define_workflow(sess, {**workflow("api_wf", task("t1")), "schedule": "@hourly"})
        with db.read_session() as session:
            wf = session.get(Workflow, "api_wf")
            assert wf is not None
            created = wf.created_at
        next_hour = created.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        assert create_scheduled_runs(db, next_hour - timedelta(microseconds=1)) == 0
        assert create_scheduled_runs(db, next_hour) == 1
        (work,) = api.claim(sess, ["task"])
        assert work.body["workflow_id"] == "api_wf" and work.body["task_id"] == "t1"
    finally:
        api.client.close()


# --- deferral and running timeouts ------------------------------------------------------------


@pytest.fixture
def one_task_run(db: Database) -> Callable[..., tuple[str, str]]:
    """A run of a workflow with one task (options given); returns (run id, attempt id)."""

    def build(**options: Any) -> tuple[str, str]:
        name = f"wf{len(attempts(db))}"
        make_workflow(db, name, None, task("t", **options), task("after", "t"))
        run_id = manual_run(db, name)
        (attempt,) = attempts(db, run_id)
        return run_id, attempt.id

    return build


def test_a_deferral_past_its_timeout_fails_the_task(
    db: Database, one_task_run: Callable[..., tuple[str, str]]
) -> None:
    run_id, attempt_id = one_task_run()
    set_attempt(db, attempt_id, state=AttemptState.RUNNING, started_at=T0)
    trigger_id = defer(db, attempt_id, T0 + timedelta(minutes=5))
    assert expire_deferrals(db, T0 + timedelta(minutes=5) - timedelta(microseconds=1)) == 0
    assert expire_deferrals(db, T0 + timedelta(minutes=5)) == 1
    with db.read_session() as session:
        attempt = session.get(TaskAttempt, attempt_id)
        trigger = session.get(Trigger, trigger_id)
        run = session.get(Run, run_id)
        audit = session.scalars(select(AuditLog).where(AuditLog.subject == attempt_id)).all()
        session.expunge_all()
    assert attempt is not None and trigger is not None and run is not None
    assert attempt.state == AttemptState.FAILED and "deferral timed out" in (attempt.error or "")
    assert trigger.state == TriggerState.CANCELLED
    # The failure propagates as any failure does: downstream skipped, run failed.
    states = {a.task_id: a.state for a in attempts(db, run_id)}
    assert states == {"t": AttemptState.FAILED, "after": AttemptState.UPSTREAM_FAILED}
    assert run.state == RunState.FAILED
    assert [a.event for a in audit] == ["deferral_timed_out"]
    assert expire_deferrals(db, T0 + timedelta(hours=1)) == 0  # once


def test_a_timed_out_deferral_is_retried_when_the_task_has_retries(
    db: Database, one_task_run: Callable[..., tuple[str, str]]
) -> None:
    run_id, attempt_id = one_task_run(retries=1, retry_delay=30)
    defer(db, attempt_id, T0)
    assert expire_deferrals(db, T0) == 1
    tries = [(a.try_number, a.state) for a in attempts(db, run_id)]
    assert tries == [(1, AttemptState.UP_FOR_RETRY), (2, AttemptState.QUEUED)]


def test_a_deferral_without_timeout_or_already_resumed_is_left_alone(
    db: Database, one_task_run: Callable[..., tuple[str, str]]
) -> None:
    _, waiting = one_task_run()
    defer(db, waiting, None)
    _, resumed = one_task_run()
    defer(db, resumed, T0)
    # The trigger fired (as the event route does) before the scheduler looked.
    set_attempt(db, resumed, state=AttemptState.QUEUED, next_try_at=None)
    assert expire_deferrals(db, T0 + timedelta(days=365)) == 0
    states = {a.id: a.state for a in attempts(db)}
    assert states[waiting] == AttemptState.DEFERRED and states[resumed] == AttemptState.QUEUED


def test_running_timeout_backstop(
    db: Database, one_task_run: Callable[..., tuple[str, str]]
) -> None:
    _, timed = one_task_run(timeout=60)
    _, untimed = one_task_run()
    for attempt_id in (timed, untimed):
        set_attempt(db, attempt_id, state=AttemptState.RUNNING, started_at=T0, heartbeat_at=T0)
    deadline = T0 + timedelta(seconds=60 + 30)
    assert expire_running(db, deadline - timedelta(microseconds=1), grace_seconds=30) == 0
    assert expire_running(db, deadline, grace_seconds=30) == 1
    states = {a.id: (a.state, a.error) for a in attempts(db)}
    assert states[timed][0] == AttemptState.FAILED and "timed out" in (states[timed][1] or "")
    assert states[untimed] == (AttemptState.RUNNING, None)
    assert expire_running(db, T0 + timedelta(days=1), grace_seconds=30) == 0


def test_running_timeout_counts_from_the_latest_claim_and_retries(
    db: Database, one_task_run: Callable[..., tuple[str, str]]
) -> None:
    run_id, attempt_id = one_task_run(timeout=10, retries=2)
    set_attempt(db, attempt_id, state=AttemptState.RUNNING, started_at=T0)
    # A pass that planned with the old started_at must not end an attempt claimed again since.
    set_attempt(db, attempt_id, started_at=T0 + timedelta(minutes=10))
    assert _expire_running(db, attempt_id, T0, 10, 0) == 0
    assert expire_running(db, T0 + timedelta(minutes=5), grace_seconds=0) == 0
    assert expire_running(db, T0 + timedelta(minutes=10, seconds=10), grace_seconds=0) == 1
    tries = [(a.try_number, a.state) for a in attempts(db, run_id)]
    assert tries == [(1, AttemptState.UP_FOR_RETRY), (2, AttemptState.QUEUED)]


# --- the pass and the thread ------------------------------------------------------------------


def test_one_pass_does_everything_and_says_when_to_wake(
    db: Database, one_task_run: Callable[..., tuple[str, str]]
) -> None:
    make_workflow(db, "hourly", "@hourly")
    _, deferred = one_task_run()
    defer(db, deferred, at(10, 40))
    _, later = one_task_run()
    defer(db, later, at(10, 50))
    _, running = one_task_run(timeout=1)
    set_attempt(db, running, state=AttemptState.RUNNING, started_at=at(9))
    result = scheduler_pass(db, at(10, 45), running_grace=5)
    assert (result.runs_created, result.deferrals_expired, result.running_expired) == (0, 1, 1)
    assert result.next_wakeup == at(10, 50) and result.errors == ()
    result = scheduler_pass(db, at(11), running_grace=5)
    assert (result.runs_created, result.deferrals_expired) == (1, 1)
    assert result.next_wakeup == at(12)


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def thread_factory() -> Iterator[Callable[..., SchedulerThread]]:
    threads: list[SchedulerThread] = []

    def build(db: Database, clock: FakeClock) -> SchedulerThread:
        thread = SchedulerThread(db, interval=600, clock=clock)
        threads.append(thread)
        thread.start()
        return thread

    yield build
    for thread in threads:
        thread.stop(timeout=10)
        assert not thread.is_alive()


def test_thread_runs_at_start_and_when_woken(
    db: Database, thread_factory: Callable[..., SchedulerThread]
) -> None:
    make_workflow(db, "hourly", "@hourly")
    clock = FakeClock(at(11, 0, 30))
    thread = thread_factory(db, clock)
    assert thread.wait_for_passes(1, timeout=30)
    assert logical_dates(db) == [at(11)]
    clock.advance(3600)
    thread.wake()
    assert thread.wait_for_passes(2, timeout=30)
    assert logical_dates(db) == [at(11), at(12)]
    assert thread.last_result is not None and thread.last_result.next_wakeup == at(13)


def test_thread_survives_database_errors(
    db_url: str, thread_factory: Callable[..., SchedulerThread], caplog: Any
) -> None:
    db = Database.from_url(db_url)  # not migrated yet: every query fails
    try:
        clock = FakeClock(at(11, 0, 30))
        thread = thread_factory(db, clock)
        assert thread.wait_for_passes(1, timeout=30)
        assert thread.is_alive() and thread.last_result is not None
        assert len(thread.last_result.errors) == 4  # every part, the repair pass included
        assert "scheduling runs failed" in caplog.text
        upgrade(db_url)
        make_workflow(db, "hourly", "@hourly")
        thread.wake()
        assert thread.wait_for_passes(2, timeout=30)
        assert logical_dates(db) == [at(11)]
    finally:
        db.dispose()


def test_now_must_be_aware(db: Database) -> None:
    with pytest.raises(ValueError, match="naive"):
        create_scheduled_runs(db, datetime(2024, 1, 1))
