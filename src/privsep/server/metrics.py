"""The server's metrics, in the Prometheus text format, served to operator sessions only
(``GET /v1/operator/metrics``, :mod:`privsep.server.routes.observability`).

Why behind an operator session and not on a listener of its own: a localhost listener answers
every local user, sandboxes on the host network included, and a second port is one more thing
to firewall on every replica. Behind the operator check, the metrics get the same
authentication, revocation and audit trail as the rest of the operator API, at no extra port.

Every label has a small, fixed set of values: routes are templates (``GET
/v1/task/variables/{key}``), never raw paths; refusal reasons are the fixed codes of the token
checks and the routes; kinds are ``task``, ``parse`` and ``trigger``. Nothing is labelled by
attempt, run or supervisor, so the series stay few however much work runs.

Several worker processes (``server.workers`` > 1): each keeps its own values, so the main
process gives every worker (and its own scheduler thread) a private directory in
``PROMETHEUS_MULTIPROC_DIR`` before any of them imports ``prometheus_client``
(:func:`~privsep.server.metrics_dir.prepare_multiprocess`), and a scrape sums the files of
all of them. With one process, the values live in memory.
"""

from __future__ import annotations

import os
import time
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from privsep.server.metrics_dir import MULTIPROC_ENV

REGISTRY = CollectorRegistry(auto_describe=True)
"""The server's own registry: an embedding process's default registry stays its own."""

REQUEST_SECONDS = Histogram(
    "privsep_server_request_duration_seconds",
    "Time from a request's arrival to its response's start, by route template",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
    registry=REGISTRY,
)
RESPONSES = Counter(
    "privsep_server_responses",
    "Responses by route template and status code",
    ["route", "status"],
    registry=REGISTRY,
)
FAST_PATH = Counter(
    "privsep_server_fast_path_answers",
    "Requests the fast path answered itself, without FastAPI",
    registry=REGISTRY,
)
CLAIMED = Counter(
    "privsep_server_claimed_items",
    "Work items handed to supervisors by claims, by kind",
    ["kind"],
    registry=REGISTRY,
)
TOKENS_ISSUED = Counter(
    "privsep_server_tokens_issued",
    "Tokens this server signed, by scope (work tokens and sessions)",
    ["scope"],
    registry=REGISTRY,
)
REFUSALS = Counter(
    "privsep_server_refusals",
    "Refused requests, by reason code (each one also has a request_denied audit record)",
    ["code"],
    registry=REGISTRY,
)
SCHEDULER_PASS_SECONDS = Histogram(
    "privsep_server_scheduler_pass_duration_seconds",
    "Time one scheduler pass took (all of its parts)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
LOG_BYTES_STORED = Counter(
    "privsep_server_log_bytes_stored",
    "Bytes of sandbox output stored in the central logs (after de-duplication and the cap)",
    registry=REGISTRY,
)

UNMATCHED: Final = "unmatched"
"""The route label of a request no route matched (a 404): one series, whatever the path."""

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def render() -> bytes:
    """The current values in the text format: this process's, or every process's when the
    server runs several (see the module docstring)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return generate_latest(REGISTRY)
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(merged)


ROUTE_KEY: Final = "privsep.route"
"""The scope key in which the fast path names the route template it answered."""


class Metered:
    """Pure ASGI middleware, outermost: each request's time until its response starts, and its
    status, under its route template. The template comes from the route that answered (FastAPI
    puts it in the scope) or from the fast path (:data:`ROUTE_KEY`); two clock reads and two
    metric updates per request, nothing that grows with the path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception before any response is what the server answers

        async def timed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                _observe(scope, status, time.perf_counter() - start)
                status = 0  # observed
            await send(message)

        try:
            await self.app(scope, receive, timed)
        finally:
            if status:
                _observe(scope, status, time.perf_counter() - start)


def _observe(scope: Scope, status: int, seconds: float) -> None:
    route = route_of(scope)
    REQUEST_SECONDS.labels(route).observe(seconds)
    RESPONSES.labels(route, str(status)).inc()


def route_of(scope: Scope) -> str:
    """``METHOD /template`` of the route that took the request, or :data:`UNMATCHED`."""
    template = scope.get(ROUTE_KEY)
    if template is None:
        route = scope.get("route")
        template = getattr(route, "path_format", None) or getattr(route, "path", None)
        if template is None:
            return UNMATCHED
    return f"{scope['method']} {template}"
