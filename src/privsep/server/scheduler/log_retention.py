"""The central logs' retention: the scheduler's pass deletes logs by age and by a byte budget
(``server.log_retention_days``, ``server.log_retention_bytes``).

Age counts from a log's last write, so a long-running attempt's log is never deleted while it
is written. The budget deletes whole logs, the ones written to longest ago first, and only
among those quiet for ten minutes: a running attempt's log is not deleted under it (and then
shipped again from its start by its supervisor). Several schedulers may run it at once: every
write is a delete of rows that are gone either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from privsep.server.db.engine import Database
from privsep.server.db.models import AttemptLog, AttemptLogChunk, AttemptLogStream

_PRUNE_BATCH = 500
_BATCHES_PER_PASS = 20
# The byte budget deletes only logs nobody wrote to for this long: the running ones stay.
_BUDGET_QUIET = timedelta(minutes=10)


@dataclass(frozen=True)
class LogRetention:
    """The retention policy the scheduler enforces (see :func:`prune_logs`)."""

    days: float = 30.0
    max_bytes: int = 0


def prune_logs(db: Database, now: datetime, policy: LogRetention) -> int:
    """Delete logs last written more than ``policy.days`` ago (0: never), then, while all logs
    together pass ``policy.max_bytes`` (0: no budget), the ones written to longest ago among
    those quiet for ten minutes. Returns how many logs were deleted; at most a few batches
    per pass, so one pass never holds a long transaction."""
    deleted = 0
    if policy.days > 0:
        cutoff = now - timedelta(days=policy.days)
        deleted += _delete_where(db, AttemptLog.updated_at < cutoff)
    if policy.max_bytes > 0:
        with db.read_session() as session:
            total = session.scalar(select(func.coalesce(func.sum(AttemptLog.size_bytes), 0)))
        over = int(total or 0) - policy.max_bytes
        if over > 0:
            deleted += _delete_oldest(db, over, now - _BUDGET_QUIET)
    return deleted


def _delete_ids(session: Session, ids: list[str]) -> None:
    for model in (AttemptLogChunk, AttemptLogStream, AttemptLog):
        session.execute(delete(model).where(model.item_id.in_(ids)))


def _delete_where(db: Database, condition: Any) -> int:
    deleted = 0
    for _ in range(_BATCHES_PER_PASS):
        with db.write_session() as session:
            ids = list(
                session.scalars(select(AttemptLog.item_id).where(condition).limit(_PRUNE_BATCH))
            )
            if ids:
                _delete_ids(session, ids)
        deleted += len(ids)
        if len(ids) < _PRUNE_BATCH:
            break
    return deleted


def _delete_oldest(db: Database, over: int, quiet_since: datetime) -> int:
    with db.write_session() as session:
        rows = session.execute(
            select(AttemptLog.item_id, AttemptLog.size_bytes)
            .where(AttemptLog.updated_at < quiet_since)
            .order_by(AttemptLog.updated_at)
            .limit(_PRUNE_BATCH)
        ).all()
        ids: list[str] = []
        for row in rows:
            if over <= 0:
                break
            ids.append(row.item_id)
            over -= row.size_bytes
        if ids:
            _delete_ids(session, ids)
    return len(ids)


__all__ = ["LogRetention", "prune_logs"]
