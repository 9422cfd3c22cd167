"""Consume wake-ups as a Celery worker, so a claim happens when work is ready, not at a poll.

With ``supervisor.wakeups = celery`` the supervisor runs a Celery worker in one thread of its
own process (the solo pool: the task body only sets a flag), subscribed to the Celery queues
of its work queues (``supervisor.queues``). A wake-up carries no token and no payload (see
:mod:`privsep._wakeups`); all it does is make the loop's next claim happen now. The claim still
goes through the API, so what a wake-up says is never trusted: a forged one costs an empty
claim, a lost one the poll interval, a repeated one nothing (a claim is a conditional UPDATE).

The worker acks late and prefetches one: a wake-up is acked once the loop has been woken, and
a supervisor that dies holding one leaves it to go back to the queue for another. It has no
remote control, so a broker cannot shut it down or change its queues. If the broker is down
the worker retries its connection in its thread while the loop goes on polling.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from privsep._wakeups import TASK_NAME, WAKEUP_KINDS, celery_app, celery_queue, display_broker

if TYPE_CHECKING:
    from privsep.runner.supervisor.settings import SupervisorSettings

log = logging.getLogger("privsep.supervisor.wakeups")

STOP_TIMEOUT = 10.0


class WakeupConsumer:
    """A Celery worker in a thread that calls ``on_wakeup`` for each wake-up it takes."""

    def __init__(
        self,
        broker_url: str,
        queues: Sequence[str],
        *,
        name: str,
        on_wakeup: Callable[[], None],
    ) -> None:
        self._broker_url = broker_url
        self._queues = [celery_queue(q) for q in queues]
        self._name = name
        self._on_wakeup = on_wakeup
        self._worker: Any = None
        self._thread: threading.Thread | None = None
        self.received = 0  # wake-ups taken, for the health record and tests

    @classmethod
    def started_for(
        cls, settings: SupervisorSettings, *, on_wakeup: Callable[[], None]
    ) -> WakeupConsumer | None:
        """The running consumer ``supervisor.wakeups = "celery"`` asks for; None when the
        supervisor only polls."""
        if settings.wakeups != "celery":
            return None
        consumer = cls(
            settings.wakeups_broker, settings.queues, name=settings.name, on_wakeup=on_wakeup
        )
        consumer.start()
        return consumer

    def start(self) -> None:
        """Start the worker thread; it connects (and reconnects) to the broker by itself."""
        app = celery_app(self._broker_url, name="privsep-supervisor")

        @app.task(name=TASK_NAME, acks_late=True, ignore_result=True)  # type: ignore[untyped-decorator]
        def wakeup(kind: str = "", ids: Sequence[str] = ()) -> None:
            # Nothing from the message is used but its arrival: the claim asks the server.
            if kind in WAKEUP_KINDS:
                self.received += 1
                self._on_wakeup()

        self._worker = app.WorkController(
            hostname=f"privsep@{self._name}",
            pool="solo",
            concurrency=1,
            queues=self._queues,
            loglevel=logging.WARNING,
            logfile=None,
            ready_callback=None,
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
        )
        self._thread = threading.Thread(target=self._serve, name="privsep-wakeups", daemon=True)
        self._thread.start()
        log.info(
            "consuming wake-ups from %s on %s",
            display_broker(self._broker_url),
            ", ".join(self._queues),
        )

    def _serve(self) -> None:
        try:
            self._worker.start()
        except Exception:  # the loop polls on; say why wake-ups stopped
            log.exception("the wake-up worker stopped; claims fall back to polling")

    def stop(self) -> None:
        """Stop the worker (a wake-up being handled is acked first) and wait for its thread."""
        if self._worker is None or self._thread is None:
            return
        from celery.worker import state

        # What celery's own embedded worker does: the consumer's loop checks this flag.
        state.should_terminate = 0
        self._thread.join(STOP_TIMEOUT)
        if self._thread.is_alive():
            log.warning("the wake-up worker did not stop within %.0f s", STOP_TIMEOUT)
        state.should_terminate = None
        self._worker = None
