"""The wake-up message, as the server publishes it and the supervisor consumes it.

Celery carries wake-ups only: "work is ready on this queue", plus the ids of the items. Never a
token, a payload or a run's configuration, so a broker that anyone can read hands out nothing:
whoever reads a wake-up still has to claim through the API with a registered supervisor's
credential to get the item and its token. A wake-up lost costs latency (the supervisor's poll
finds the work later); a wake-up repeated costs one empty claim (a claim is a conditional
UPDATE, so nothing runs twice).

The server (publisher) and the supervisor (worker) must agree on the task name, the queue
naming and the Celery settings, and neither may import the other, so both import this module,
which imports nothing of privsep (an import-linter contract keeps it so). Celery itself is
imported only when a wake-up transport is configured: it is the ``celery`` extra.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["TASK_NAME", "WAKEUP_KINDS", "celery_app", "celery_queue", "display_broker"]

TASK_NAME = "privsep.wakeup"
"""The one Celery task a wake-up is sent as. Its keyword arguments are ``kind`` (one of
:data:`WAKEUP_KINDS`) and ``ids`` (item ids: attempt, parse job or trigger ids)."""

WAKEUP_KINDS = frozenset({"task", "parse", "trigger"})

QUEUE_PREFIX = "privsep."
"""Celery queue (a Redis list) of privsep work queue ``q``: ``privsep.q``, so that privsep's
queues cannot collide with another Celery application's on a shared broker."""


def celery_queue(queue: str) -> str:
    """The Celery queue that carries the wake-ups of privsep work queue ``queue``."""
    return QUEUE_PREFIX + queue


def display_broker(url: str) -> str:
    """The broker URL with any password replaced by ``***``, for logs and errors."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def celery_app(broker_url: str, *, name: str) -> Any:
    """A Celery application for wake-ups on ``broker_url``, set up the same on both sides.

    JSON only (a pickled message from a writable broker would be code run by a trusted
    process); no result backend (nobody waits for a wake-up); late acks and a prefetch of one,
    so a busy or dead supervisor holds at most one wake-up and a wake-up it took but never
    handled goes back to the queue; no remote control and no events, so the broker cannot
    steer a supervisor's worker (shut it down, change its queues) either.
    """
    from celery import Celery

    app = Celery(name, broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_default_queue=celery_queue("default"),
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=True,
        # A publish must not hold the publisher's thread for long while the broker is down:
        # it is retried by the next wake-up, and the supervisors poll meanwhile.
        broker_transport_options={"socket_connect_timeout": 2, "socket_timeout": 5},
    )
    return app
