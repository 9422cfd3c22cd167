"""How the end of a work item reaches the server, even across an outage.

A sandbox may report its own end (a task's ``succeed``, a parse's result) through the
credential socket's proxy; otherwise, or when it did not exit cleanly, the supervisor reports
an outcome for it. An outcome the server could not take is kept and sent again with backoff:
the heartbeats keep the item "running" on the server until it hears. Kept apart from the loop
because this is the part the server's idempotency depends on, and it changes with the report
routes (:data:`REPORT_CALLS`), not with the loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from privsep.client import _surface
from privsep.runner.api.session import ApiRefused, ServerUnavailable, SupervisorApi

if TYPE_CHECKING:
    from privsep.sandbox import ExitStatus

log = logging.getLogger("privsep.supervisor")

# A sandbox's own report of its work item's end (the REPORT rows of the sandbox surface). Once
# the server has answered one of these with a 2xx, it has ended the item (the attempt or parse
# job is no longer running), so a clean exit needs no outcome from us. Trigger sandboxes have
# no such call: they always get one.
REPORT_CALLS = _surface.REPORT_CALLS
# Outcomes the server could not take: first retry after this, doubling up to the cap.
OUTCOME_RETRY_MIN = 0.5
OUTCOME_RETRY_MAX = 5.0


@dataclass
class Unreported:
    """An outcome the server could not be told yet (it was down). Kept and sent again: the
    heartbeats keep the item's attempt "running" on the server until it hears the outcome."""

    body: dict[str, Any]
    next_try: float
    delay: float = OUTCOME_RETRY_MIN


class Outcomes:
    """What the server has heard, and what it still must. Loop thread, but for
    :meth:`note_proxied` (the credential server's proxy threads)."""

    def __init__(self, api: SupervisorApi) -> None:
        self._api = api
        self.unreported: list[Unreported] = []
        # Sandboxes whose own report the server accepted. Added to by the proxy threads,
        # read and emptied by the loop; set.add/discard are atomic.
        self._reported: set[str] = set()

    def note_proxied(self, sandbox_id: str, method: str, path: str, status: int) -> bool:
        """Note a proxied call; True if it was the sandbox's accepted report of its end."""
        if 200 <= status < 300 and (method, path) in REPORT_CALLS:
            self._reported.add(sandbox_id)
            return True
        return False

    def finished(self, sandbox_id: str, kind: str, item_id: str, status: ExitStatus) -> None:
        """A sandbox ended: report its outcome unless its own report already ended the item."""
        reported = sandbox_id in self._reported
        self._reported.discard(sandbox_id)
        if reported and status.ok:
            # The server heard the sandbox's own report and ended the item; an outcome
            # now would only be ignored (it cost a request and a write transaction).
            log.debug("%s %s reported its own outcome", kind, item_id)
            return
        code = status.exit_code
        self.report(kind, item_id, code, "" if code == 0 else str(status.detail or status))

    def report(self, kind: str, item_id: str, exit_code: int | None, reason: str) -> None:
        body = {
            "kind": kind,
            "id": item_id,
            "exit_code": exit_code,
            "reason": reason[:4000] or ("" if exit_code == 0 else "sandbox failed"),
        }
        if exit_code == 0:
            body["reason"] = "sandbox exited without reporting an outcome"
        if not self._send(body):
            log.warning(
                "outcome of %s %s not reported: the server is unavailable; will retry",
                kind,
                item_id,
            )
            self.unreported.append(Unreported(body, time.monotonic() + OUTCOME_RETRY_MIN))

    def next_retry(self) -> float:
        """When the earliest unreported outcome is due again (monotonic; inf if none)."""
        return min((p.next_try for p in self.unreported), default=float("inf"))

    def retry(self, now: float) -> None:
        """Send the outcomes the server missed; stop at the first failure (it is still down)."""
        for pending in list(self.unreported):
            if now < pending.next_try:
                continue
            if not self._send(pending.body):
                for later in self.unreported:
                    later.delay = min(OUTCOME_RETRY_MAX, later.delay * 2)
                    later.next_try = max(later.next_try, now + later.delay)
                return
            self.unreported.remove(pending)
            log.info("outcome of %s %s reported late", pending.body["kind"], pending.body["id"])

    def last_try(self) -> None:
        """At shutdown: one more try for each, then say which never reached the server."""
        if not self.unreported:
            return
        self.retry(float("inf"))
        for pending in self.unreported:
            log.error(
                "outcome of %s %s never reached the server; it ends the item when this "
                "supervisor starts again",
                pending.body["kind"],
                pending.body["id"],
            )

    def _send(self, body: dict[str, Any]) -> bool:
        """One try, never blocking the loop on a retry: True once the server has answered
        (taken or refused), False if it could not be reached."""
        try:
            self._api.call("POST", "/v1/supervisor/outcome", body)
        except ServerUnavailable:
            return False
        except ApiRefused as exc:
            log.warning("outcome of %s %s refused: %s", body["kind"], body["id"], exc)
        return True


__all__ = ["OUTCOME_RETRY_MAX", "OUTCOME_RETRY_MIN", "REPORT_CALLS", "Outcomes", "Unreported"]
