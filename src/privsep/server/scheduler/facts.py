"""What the scheduler needs from a workflow version's definition, cached by content hash.

Both the schedule pass (:mod:`.scheduled_runs`, for each active workflow's schedule) and the
running-timeout backstop (:mod:`.timeouts`, for each long-running attempt's task timeout) read
the pinned version's definition on every pass. This module owns reading and caching it, so the
two passes share one parse per version and the cache's validity rule lives in one place.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from privsep.server.db.models import WorkflowVersion, version_digest
from privsep.server.scheduler.schedules import InvalidSchedule, Schedule, parse_schedule
from privsep.server.schemas import WorkflowDefinition

log = logging.getLogger("privsep.server.scheduler")

_FACTS_CACHE_SIZE: Final = 2048


@dataclass(frozen=True)
class VersionFacts:
    """What the scheduler needs from one workflow version's definition."""

    schedule: Schedule | None
    schedule_error: str | None
    timeouts: Mapping[str, float | None]


class FactsCache:
    """Version facts keyed by ``content_hash``.

    Each pass looks at every active workflow's schedule and every long-running attempt's
    timeout; loading and parsing a definition (up to 10,000 tasks of JSON) for each of them on
    every pass would dominate the pass. The content hash is recomputed from the row's
    definition text and source URI (:func:`~privsep.server.db.models.version_digest`, as the
    parse route made it), so an entry can never describe a different definition; a row whose
    hash does not match (hand-made) is parsed every time but never cached.
    """

    def __init__(self, size: int = _FACTS_CACHE_SIZE) -> None:
        self._size = size
        self._entries: dict[str, VersionFacts] = {}
        self._lock = threading.Lock()

    def get(self, session: Session, version_id: int, content_hash: str) -> VersionFacts:
        with self._lock:
            found = self._entries.get(content_hash)
        if found is not None:
            return found
        row = session.execute(
            select(WorkflowVersion.definition, WorkflowVersion.source_uri).where(
                WorkflowVersion.id == version_id
            )
        ).first()
        text = None if row is None else row.definition
        facts = self._parse(version_id, text or "")
        if row is not None and version_digest(row.definition, row.source_uri) == content_hash:
            with self._lock:
                if len(self._entries) >= self._size:
                    self._entries.pop(next(iter(self._entries)))
                self._entries[content_hash] = facts
        return facts

    @staticmethod
    def _parse(version_id: int, text: str) -> VersionFacts:
        try:
            definition = WorkflowDefinition.model_validate(json.loads(text), strict=False)
        except ValueError as exc:
            log.warning("workflow version %d has an unreadable definition: %s", version_id, exc)
            return VersionFacts(None, f"unreadable definition: {exc}", {})
        timeouts = {task.task_id: task.timeout for task in definition.tasks}
        try:
            schedule = parse_schedule(definition.schedule)
        except InvalidSchedule as exc:
            log.warning(
                "workflow %s (version %d) will not be scheduled: %s",
                definition.workflow_id,
                version_id,
                exc,
            )
            return VersionFacts(None, str(exc), timeouts)
        return VersionFacts(schedule, None, timeouts)

    def __contains__(self, content_hash: str) -> bool:
        with self._lock:
            return content_hash in self._entries

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


cache: Final = FactsCache()
"""The process's one cache: every pass and every thread of this process share it."""
