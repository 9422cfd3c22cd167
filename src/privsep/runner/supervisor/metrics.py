"""The supervisor's metrics, in the Prometheus text format, on a listener of its own
(``supervisor.metrics_bind``, off by default, loopback addresses only).

The supervisor has no operator session to check, so its metrics stay on this host: a local
agent (node exporter's textfile collector, a Prometheus agent, a reverse proxy with
authentication) forwards them if they must go further. They hold counts and timings by
kind, nothing that names a workflow, an attempt or a secret, and every label has a fixed
set of values (``task``, ``parse``, ``trigger``; ``work``, ``empty``, ``failed``), so the
loop pays a few dictionary look-ups per item and the series never grow with the work.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from privsep.runner.errors import CommandError

log = logging.getLogger("privsep.supervisor")

KINDS = ("task", "parse", "trigger")

REGISTRY = CollectorRegistry(auto_describe=True)

CLAIMS = Counter(
    "privsep_supervisor_claims",
    "Claim requests to the server, by result: work (items came back), empty, failed",
    ["result"],
    registry=REGISTRY,
)
CLAIMED = Counter(
    "privsep_supervisor_claimed_items",
    "Work items claimed from the server, by kind",
    ["kind"],
    registry=REGISTRY,
)
LAUNCHES = Counter(
    "privsep_supervisor_launches",
    "Sandboxes launched for claimed items, by kind and result (started or failed)",
    ["kind", "result"],
    registry=REGISTRY,
)
LAUNCH_SECONDS = Histogram(
    "privsep_supervisor_launch_duration_seconds",
    "Time from a claimed item to its sandbox running with its token set, by kind",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
RUNNING = Gauge(
    "privsep_supervisor_running_sandboxes",
    "Sandboxes running now, by kind",
    ["kind"],
    registry=REGISTRY,
)
LOG_SHIP_LAG = Gauge(
    "privsep_supervisor_log_shipping_lag_seconds",
    "How long the oldest sandbox output not yet on the server has waited (0: all shipped)",
    registry=REGISTRY,
)
LOG_PENDING_BYTES = Gauge(
    "privsep_supervisor_log_pending_bytes",
    "Bytes of sandbox output written on this node and not yet shipped to the server",
    registry=REGISTRY,
)
LOG_SHIPPED_BYTES = Counter(
    "privsep_supervisor_log_shipped_bytes",
    "Bytes of sandbox output the server acknowledged",
    registry=REGISTRY,
)
LOG_SHIP_REQUESTS = Counter(
    "privsep_supervisor_log_ship_requests",
    "Log shipping requests, by result: ok, failed (server unavailable), refused",
    ["result"],
    registry=REGISTRY,
)
for _kind in KINDS:  # every series from the start: a scrape before any work reads 0
    CLAIMED.labels(_kind)
    RUNNING.labels(_kind)
    for _result in ("started", "failed"):
        LAUNCHES.labels(_kind, _result)
for _result in ("work", "empty", "failed"):
    CLAIMS.labels(_result)
for _result in ("ok", "failed", "refused"):
    LOG_SHIP_REQUESTS.labels(_result)


class _HasKind(Protocol):
    kind: str


def claimed(items: Iterable[Mapping[str, Any]] | None) -> None:
    """Count one claim request: ``None`` when it failed, else the items it returned."""
    if items is None:
        CLAIMS.labels("failed").inc()
        return
    got = 0
    for item in items:
        CLAIMED.labels(str(item.get("kind"))).inc()
        got += 1
    CLAIMS.labels("work" if got else "empty").inc()


def running(active: Iterable[_HasKind]) -> None:
    """Set the running gauge from what the loop holds now (after a launch or a reap)."""
    counts = dict.fromkeys(KINDS, 0)
    for item in active:
        counts[item.kind] = counts.get(item.kind, 0) + 1
    for kind, count in counts.items():
        RUNNING.labels(kind).set(count)


def loopback_address(bind: str) -> tuple[str, int]:
    """``(host, port)`` of ``bind``, which must be a loopback address (the configuration's
    pattern says so already; this is the check that does not depend on it)."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    try:
        number = int(port)
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback, number = False, 0
    if not loopback or not 0 < number < 65536:
        raise CommandError(
            f"supervisor.metrics_bind {bind!r} is not a loopback host:port (127.0.0.1:9781)"
        )
    return host, number


class Listener(Protocol):
    def shutdown(self) -> None: ...

    def server_close(self) -> None: ...


def serve(bind: str) -> Listener | None:
    """Start the metrics listener on ``bind`` in a daemon thread (``None`` when ``bind`` is
    empty). A port already taken is a one-line error: the supervisor does not start."""
    if not bind:
        return None
    host, port = loopback_address(bind)
    try:
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        raise CommandError(
            f"cannot listen for metrics on {bind} (supervisor.metrics_bind): {exc.strerror}"
        ) from None
    log.info("metrics on http://%s/metrics", bind)
    return server


def stop(listener: Listener | None) -> None:
    if listener is not None:
        listener.shutdown()
        listener.server_close()
