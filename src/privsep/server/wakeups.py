"""Publish a wake-up when work becomes claimable, after the transaction that made it commits.

Work becomes claimable in many places (a run triggered or scheduled, a downstream task queued
after its upstream succeeded, a retry, a deferred task resumed by its trigger, a trigger
parked, a parse job queued), and each of them writes its rows inside some write transaction.
Rather than a publish call at each place, which the next place would forget, one listener on
the write sessions (:func:`install`) watches what every flush writes:

* a new or re-queued :class:`TaskAttempt` in state ``queued`` is ready on its queue (a retry
  whose ``next_try_at`` is later is published with that delay);
* a new :class:`Trigger` in state ``queued`` is ready on the ``default`` queue;
* rows written with a Core statement, which the listener cannot see, are noted by the writer
  with :func:`note_ready` (parse jobs).

The notes of a transaction are published only once it committed (a rolled-back transaction
made nothing claimable), and never by the request's thread: :class:`Publisher` hands them to a
background thread through a bounded queue, so a slow or dead broker never holds a request or
a lock. A broker that is down is logged once (and its return once); its wake-ups are dropped,
which costs latency only: supervisors poll.

Triggers and parse jobs are not routed by queue (any supervisor runs them, as Airflow's
triggerer and parser are not routed by a task's ``queue``), so their wake-ups go to ``default``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import Session

from privsep._wakeups import TASK_NAME, celery_app, celery_queue, display_broker
from privsep.server.db.engine import Database
from privsep.server.db.models import (
    DEFAULT_QUEUE,
    AttemptState,
    TaskAttempt,
    Trigger,
    TriggerState,
    utcnow,
)

log = logging.getLogger("privsep.server.wakeups")

_NOTES = "privsep_ready"  # the key of a session's pending notes in ``Session.info``
MAX_PENDING = 1000
"""Wake-ups waiting for the publisher thread at most; more are dropped (polling finds them)."""
MAX_IDS = 100
"""Item ids in one wake-up at most: a run of a thousand roots is ten messages, not one huge."""


@dataclass(frozen=True)
class Wakeup:
    """Work of ``kind`` is (or in ``delay`` seconds will be) ready on ``queue``."""

    queue: str
    kind: str
    ids: tuple[str, ...]
    delay: float = 0.0


def note_ready(
    session: Session, kind: str, ids: Iterable[str], *, queue: str = DEFAULT_QUEUE
) -> None:
    """Note that this transaction makes ``ids`` of ``kind`` claimable: for a writer that used a
    Core statement, which the flush listener does not see. Costs a list append when no
    transport is installed (nobody reads the note then)."""
    notes: list[tuple[str, str, str, float]] = session.info.setdefault(_NOTES, [])
    notes.extend((queue, kind, item_id, 0.0) for item_id in ids)


def _collect(session: Session, _flush_context: Any) -> None:
    """After each flush: note every attempt and trigger it made claimable."""
    notes: list[tuple[str, str, str, float]] | None = None
    now: datetime | None = None
    for obj in (*session.new, *session.dirty):
        if isinstance(obj, TaskAttempt):
            if obj.state != AttemptState.QUEUED or not _changed_to_queued(session, obj):
                continue
            delay = 0.0
            if obj.next_try_at is not None:
                now = now or utcnow()
                delay = max(0.0, (obj.next_try_at - now).total_seconds())
            item = (obj.queue or DEFAULT_QUEUE, "task", obj.id, delay)
        elif isinstance(obj, Trigger):
            if obj.state != TriggerState.QUEUED or obj not in session.new:
                continue
            item = (DEFAULT_QUEUE, "trigger", obj.id, 0.0)
        else:
            continue
        if notes is None:
            notes = session.info.setdefault(_NOTES, [])
        notes.append(item)


def _changed_to_queued(session: Session, obj: TaskAttempt) -> bool:
    """A new attempt, or one whose ``state`` this flush changed (to ``queued``)."""
    if obj in session.new:
        return True
    return bool(inspect(obj).attrs["state"].history.deleted)


def _grouped(notes: list[tuple[str, str, str, float]]) -> list[Wakeup]:
    """One wake-up per queue, kind and delay, of at most :data:`MAX_IDS` ids each."""
    groups: dict[tuple[str, str, float], list[str]] = {}
    for queue_name, kind, item_id, delay in notes:
        ids = groups.setdefault((queue_name, kind, round(delay, 1)), [])
        if item_id not in ids:
            ids.append(item_id)
    return [
        Wakeup(queue_name, kind, tuple(ids[i : i + MAX_IDS]), delay)
        for (queue_name, kind, delay), ids in groups.items()
        for i in range(0, len(ids), MAX_IDS)
    ]


class Publisher:
    """Sends wake-ups from one background thread, started on first use in each process (a
    server worker is forked after the parent made its state, and a thread does not survive a
    fork)."""

    def __init__(self, broker_url: str) -> None:
        self._broker_url = broker_url
        self._lock = threading.Lock()
        self._pid = 0
        self._queue: queue.Queue[Wakeup | None] = queue.Queue(MAX_PENDING)
        self._thread: threading.Thread | None = None
        self._failing = False
        self._dropped = False

    def publish(self, wakeups: Iterable[Wakeup]) -> None:
        """Queue ``wakeups`` for the thread; never blocks (a full queue drops them)."""
        self._ensure_thread()
        for wakeup in wakeups:
            try:
                self._queue.put_nowait(wakeup)
            except queue.Full:
                if not self._dropped:
                    log.warning(
                        "wake-ups dropped: %d are waiting for the broker already; "
                        "supervisors will find the work by polling",
                        MAX_PENDING,
                    )
                self._dropped = True
                return

    def after_commit(self, session: Session) -> None:
        """The session event: publish what the committed transaction noted."""
        notes = session.info.pop(_NOTES, None)
        if notes:
            self.publish(_grouped(notes))

    def after_rollback(self, session: Session) -> None:
        session.info.pop(_NOTES, None)

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid() and self._thread is not None:
            return
        with self._lock:
            if self._pid == os.getpid() and self._thread is not None:
                return
            # After a fork: the parent's queue may hold items and its thread is gone.
            self._queue = queue.Queue(MAX_PENDING)
            self._thread = threading.Thread(target=self._run, name="privsep-wakeups", daemon=True)
            self._pid = os.getpid()
            self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread after what is queued (within ``timeout``)."""
        thread = self._thread
        if thread is None or self._pid != os.getpid():
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        thread.join(timeout)

    def _run(self) -> None:
        app = celery_app(self._broker_url, name="privsep-server")
        while True:
            wakeup = self._queue.get()
            if wakeup is None:
                return
            self._send(app, wakeup)

    def _send(self, app: Any, wakeup: Wakeup) -> None:
        try:
            app.send_task(
                TASK_NAME,
                kwargs={"kind": wakeup.kind, "ids": list(wakeup.ids)},
                queue=celery_queue(wakeup.queue),
                countdown=wakeup.delay or None,
                retry=False,
            )
        except Exception as exc:  # any broker failure: latency only, said once
            if not self._failing:
                log.warning(
                    "cannot publish wake-ups to %s (%s); supervisors will find the work by "
                    "polling until it answers",
                    display_broker(self._broker_url),
                    display_broker(str(exc)) or type(exc).__name__,
                )
            self._failing = True
            return
        if self._failing:
            log.info("publishing wake-ups to %s works again", display_broker(self._broker_url))
        self._failing = False
        self._dropped = False


def install(db: Database, broker_url: str) -> Publisher:
    """Publish the wake-ups of every write transaction of ``db`` to ``broker_url``."""
    publisher = Publisher(broker_url)
    db.listen("after_flush", _collect)
    db.listen("after_commit", publisher.after_commit)
    db.listen("after_soft_rollback", lambda session, _previous: publisher.after_rollback(session))
    return publisher


__all__ = ["MAX_PENDING", "Publisher", "Wakeup", "install", "note_ready"]
