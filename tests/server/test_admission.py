"""Claim admission under concurrency limits, per workflow and in total, on a real database
(SQLite and PostgreSQL); races between replicas are real threads with engines of their own,
released together by a barrier."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, update

from privsep.server.db import Database
from privsep.server.db.models import (
    AttemptState,
    Run,
    TaskAttempt,
)
from privsep.server.routes._sql import affected
from privsep.server.scheduler import (
    admit,
    claim_candidates,
)

from .scheduler_kit import (
    _fresh_version_cache,  # noqa: F401 - autouse: each test starts without the cache
    at,
    attempts,
    make_workflow,
    manual_run,
    race,
    set_attempt,
)

# --- concurrency --------------------------------------------------------------------------------


def queued_attempts(db: Database, workflow_id: str, count: int) -> list[str]:
    """``count`` queued attempts of ``workflow_id`` (one root task per run)."""
    return [attempts(db, manual_run(db, workflow_id))[0].id for _ in range(count)]


def claim(db: Database, limit: int, mode: str = "candidates", **limits: int | None) -> list[str]:
    """What the claim route does, in one transaction: pick candidates (with the limits built
    in, or filtered by ``admit`` afterwards), then one conditional UPDATE per candidate."""
    with db.write_session() as session:
        if mode == "candidates":
            chosen = claim_candidates(session, at(23), limit, **limits)
        else:
            window = session.scalars(
                select(TaskAttempt.id)
                .where(TaskAttempt.state == AttemptState.QUEUED)
                .order_by(TaskAttempt.created_at)
                .limit(limit * 4)
            ).all()
            chosen = admit(session, window, **limits)
        won: list[str] = []
        for attempt_id in chosen:
            if len(won) >= limit:
                break
            if affected(
                session,
                update(TaskAttempt)
                .where(TaskAttempt.id == attempt_id, TaskAttempt.state == AttemptState.QUEUED)
                .values(state=AttemptState.RUNNING),
            ):
                won.append(attempt_id)
        return won


def running_per_workflow(db: Database) -> dict[str, int]:
    with db.read_session() as session:
        return dict(
            session.execute(
                select(Run.workflow_id, func.count())
                .join(TaskAttempt, TaskAttempt.run_id == Run.id)
                .where(TaskAttempt.state == AttemptState.RUNNING)
                .group_by(Run.workflow_id)
            ).all()
        )


def test_admit_enforces_a_per_workflow_limit(db: Database) -> None:
    make_workflow(db, "a", None)
    make_workflow(db, "b", None)
    a = queued_attempts(db, "a", 4)
    b = queued_attempts(db, "b", 2)
    set_attempt(db, a[0], state=AttemptState.RUNNING)
    set_attempt(db, a[1], state=AttemptState.DEFERRED)  # holds no slot
    with db.write_session() as session:
        assert admit(session, [a[2], a[3], b[0], b[1]], per_workflow=2) == [a[2], b[0], b[1]]
        # Not queued any more (running, deferred, unknown) -> never admitted.
        assert admit(session, [a[0], a[1], "nope", b[0]], per_workflow=2) == [b[0]]
        assert admit(session, [a[2], a[2], b[0]], per_workflow=5) == [a[2], b[0]]
        assert admit(session, [a[2], b[0]], per_workflow=0) == []
        assert admit(session, [a[2], "nope"]) == [a[2], "nope"]  # no limits: untouched
        with pytest.raises(ValueError):
            admit(session, [a[2]], global_limit=-1)


def test_admit_enforces_a_global_limit(db: Database) -> None:
    make_workflow(db, "a", None)
    make_workflow(db, "b", None)
    a = queued_attempts(db, "a", 3)
    b = queued_attempts(db, "b", 3)
    set_attempt(db, b[2], state=AttemptState.RUNNING)
    with db.write_session() as session:
        assert admit(session, [*a, *b[:2]], global_limit=3) == [a[0], a[1]]
        # b already runs one: with one per workflow, only "a" has room.
        assert admit(session, [*a, *b[:2]], global_limit=4, per_workflow=1) == [a[0]]
        assert admit(session, a, global_limit=1) == []
    assert claim(db, 10, "admit", global_limit=4) == [a[0], a[1], a[2]]
    assert claim(db, 10, "admit", global_limit=4) == []


def test_claim_candidates_are_oldest_first_within_the_limits(db: Database) -> None:
    for name in ("a", "b", "c"):
        make_workflow(db, name, None)
    a = queued_attempts(db, "a", 5)
    b = queued_attempts(db, "b", 2)
    c = queued_attempts(db, "c", 2)
    set_attempt(db, c[0], state=AttemptState.RUNNING)
    set_attempt(db, a[4], next_try_at=at(23, 30))  # a retry that is not due yet
    with db.write_session() as session:
        # No limits: the route's plain oldest-first window.
        assert claim_candidates(session, at(23), 2) == a[:4] + b[:2] + c[1:2]
        assert claim_candidates(session, at(23, 30), 3) == [*a, *b, c[1]]
        # "a"'s backlog does not crowd out "b" and "c", which still have room.
        assert claim_candidates(session, at(23), 10, per_workflow=2) == [a[0], a[1], *b, c[1]]
        assert claim_candidates(session, at(23), 3, per_workflow=1) == [a[0], b[0]]
        assert claim_candidates(session, at(23), 10, global_limit=4) == a[:3]
        assert claim_candidates(session, at(23), 10, global_limit=1) == []
        assert claim_candidates(session, at(23), 10, per_workflow=2, global_limit=3) == a[:2]
        assert claim_candidates(session, at(23), 0, per_workflow=2) == []


@pytest.mark.parametrize("mode", ["candidates", "admit"])
def test_concurrency_limits_hold_across_racing_replicas(migrated_db_url: str, mode: str) -> None:
    db = Database.from_url(migrated_db_url)
    try:
        for name in ("a", "b", "c"):
            make_workflow(db, name, None)
            queued_attempts(db, name, 6)

        def racing_claims() -> int:
            won = race(
                migrated_db_url, 6, lambda d: claim(d, 3, mode, per_workflow=2, global_limit=5)
            )
            per_workflow = running_per_workflow(db)
            assert sum(per_workflow.values()) <= 5 and max(per_workflow.values()) <= 2
            return sum(len(w) for w in won)

        won = racing_claims()
        if mode == "candidates":  # exact: the limits are filled, never exceeded
            assert won == 5 and sorted(running_per_workflow(db).values()) == [1, 2, 2]
        # Free the running attempts of "a"; racing claims never overfill the freed slots.
        with db.write_session() as session:
            running_a = session.scalars(
                select(TaskAttempt.id)
                .join(Run, Run.id == TaskAttempt.run_id)
                .where(Run.workflow_id == "a", TaskAttempt.state == AttemptState.RUNNING)
            ).all()
            session.execute(
                update(TaskAttempt)
                .where(TaskAttempt.id.in_(running_a))
                .values(state=AttemptState.SUCCESS)
            )
        racing_claims()
        if mode == "candidates":
            assert sum(running_per_workflow(db).values()) == 5
    finally:
        db.dispose()
