"""The heartbeat's word on discovery, for the status page: whether this supervisor's folder
is in sync with the server (``up_to_date``), why not (``failing``), or that discovery is off.

Each scan failure is logged once, when it first appears, and once more when scans work again,
so a broken manifest does not fill the log at every scan.
"""

from __future__ import annotations

import logging
from typing import Any

from privsep.runner.api.session import ApiRefused, SupervisorApi

log = logging.getLogger("privsep.supervisor")

MAX_ERROR = 2000  # the server's DiscoveryStatus limit


class DiscoveryHealth:
    """What discovery last did, and how the heartbeat reports it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.failure = ""  # the last scan's or report's error; empty once one works
        self.scanned = False
        # A server older than this supervisor refuses the unknown field (422): then the
        # heartbeat goes without it, as before, rather than failing every time.
        self.server_listens = True

    def failed(self, error: str) -> None:
        if error != self.failure:
            log.error("discovery found nothing this time: %s", error)
        self.failure = error
        self.scanned = True

    def worked(self) -> None:
        if self.failure:
            log.info("discovery works again")
        self.failure = ""
        self.scanned = True

    def status(self) -> dict[str, Any] | None:
        """The heartbeat's ``discovery`` field; None says nothing (before the first scan)."""
        if not self.enabled:
            return {"state": "off"}
        if self.failure:
            return {"state": "failing", "error": self.failure[:MAX_ERROR]}
        return {"state": "up_to_date"} if self.scanned else None

    def send_heartbeat(self, api: SupervisorApi, held: dict[str, list[str]]) -> None:
        """One heartbeat listing ``held``, with discovery's state when the server takes it."""
        status = self.status() if self.server_listens else None
        if status is None:
            api.call("POST", "/v1/supervisor/heartbeat", held)
            return
        try:
            api.call("POST", "/v1/supervisor/heartbeat", {**held, "discovery": status})
        except ApiRefused as exc:
            if exc.status != 422:
                raise
            log.info("the server takes no discovery state in heartbeats; sending none")
            self.server_listens = False
            api.call("POST", "/v1/supervisor/heartbeat", held)
