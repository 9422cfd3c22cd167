"""From a claimed work item to a running sandbox that can get its token.

Launching is where the supervisor's trust decisions meet the sandbox backend: which entry
point runs, with what network, what the child may read and what is hidden from it, and which
credential socket it is given (bound to the process before the token is set, so the token is
answered only to that process's tree). Kept apart from the loop so that those decisions read
in one place, in the order they are made.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from privsep.runner.errors import CommandError
from privsep.runner.sources.bundles import BundleStore
from privsep.runner.supervisor import metrics
from privsep.runner.supervisor.credsock import CredentialServer, SocketEntry
from privsep.runner.supervisor.logship import LogShipper, mark_resumed
from privsep.runner.supervisor.orphans import OrphanRecords
from privsep.runner.supervisor.settings import SupervisorSettings

if TYPE_CHECKING:
    from privsep.sandbox import ContainerBackend, ContainerHandle, ProcessBackend, ProcessHandle

Backend: TypeAlias = "ProcessBackend | ContainerBackend"
Handle: TypeAlias = "ProcessHandle | ContainerHandle"

log = logging.getLogger("privsep.supervisor")

ENTRY_POINTS = {
    "task": "privsep.client._task:main",
    "parse": "privsep.client._parse:main",
    "trigger": "privsep.client._trigger:main",
}


class LaunchFailed(Exception):
    """The item could not be started in a sandbox; the message says why (its outcome)."""


@dataclass
class Active:
    """One work item running in one sandbox."""

    kind: str
    item_id: str
    sandbox_id: str
    handle: Handle
    socket: SocketEntry
    log_path: str
    started: float
    token_issued: float
    token_expires: int
    next_refresh: float
    refreshable: bool = True
    # A trigger batch's triggers: the heartbeat names them, so the server keeps them ours.
    trigger_ids: tuple[str, ...] = ()


def refresh_time(issued: float, expires: float, rng: random.Random) -> float:
    """When to refresh a token: at 50-80% of its lifetime, jittered so a fleet of sandboxes
    does not refresh in step."""
    life = max(1.0, expires - issued)
    return issued + life * rng.uniform(0.5, 0.8)


def make_backend(settings: SupervisorSettings) -> Backend:
    """The ``sandbox.backend`` the configuration names; a host that cannot run it is a
    one-line error (no engine, no image, no SDK), not a traceback."""
    from privsep.sandbox import ProcessBackend, SandboxUnavailable, UidPool

    pool = UidPool(settings.uid_first, settings.uid_count)
    try:
        if settings.backend == "container":
            from privsep.sandbox.container import ContainerBackend

            return ContainerBackend(
                image=settings.image or None,
                uid_pool=pool,
                log_dir=str(settings.logs_dir),
                supervisor=settings.name,
            )
        return ProcessBackend(
            launch_mode=settings.launch_mode,  # type: ignore[arg-type]
            uid_pool=pool,
            log_dir=str(settings.logs_dir),
            prewarm=settings.prewarm,
        )
    except SandboxUnavailable as exc:
        raise CommandError(str(exc).removeprefix("privsep: ")) from None


@dataclass
class Launcher:
    """Starts claimed items in sandboxes of one backend, each with its credential socket."""

    settings: SupervisorSettings
    backend: Backend
    creds: CredentialServer
    bundles: BundleStore
    records: OrphanRecords
    shipper: LogShipper | None = None
    _rng: random.Random = field(default_factory=random.Random, repr=False)  # jitter only

    def next_refresh(self, issued: float, expires: float) -> float:
        return refresh_time(issued, expires, self._rng)

    def launch(self, item: dict[str, Any], now: float) -> Active:
        """Start ``item`` (as claimed) in a new sandbox; :class:`LaunchFailed` if it could
        not be started (its socket is gone again then). Counted and timed by kind."""
        began = time.perf_counter()
        try:
            active = self._launch(item, now)
        except LaunchFailed:
            metrics.LAUNCHES.labels(item["kind"], "failed").inc()
            raise
        metrics.LAUNCH_SECONDS.labels(active.kind).observe(time.perf_counter() - began)
        metrics.LAUNCHES.labels(active.kind, "started").inc()
        return active

    def _launch(self, item: dict[str, Any], now: float) -> Active:
        from privsep.sandbox import Limits, SandboxSpec

        kind, item_id = item["kind"], item["id"]
        sandbox_id = uuid.uuid4().hex[:16]
        log_path = str(self.settings.logs_dir / f"{kind}-{item_id}.log")
        entry = None
        try:
            payload, timeout, network = self._payload(item)
            entry = self.creds.open_socket(
                sandbox_id, directory_root=str(self.settings.sockets_dir)
            )
            env = {"PRIVSEP_CREDENTIAL_SOCKET": entry.path}
            if network == "host":
                env["PRIVSEP_API_URL"] = self.settings.server_url
            spec = SandboxSpec(
                kind=kind,
                entry_point=ENTRY_POINTS[kind],
                workdir=str(self.settings.work_dir / sandbox_id),
                payload=payload,
                env=env,
                limits=Limits(wall_seconds=timeout),
                network=network,  # type: ignore[arg-type]
                bundle_paths=tuple(
                    str(p) for p in (self.settings.workflows_dir, self.bundles.root) if p.is_dir()
                ),
                hidden_paths=tuple(p for p in self.settings.hidden_paths if os.path.exists(p)),
                credential_socket=entry.path,
                log_path=log_path,
                sandbox_id=sandbox_id,
            )
            mark_resumed(log_path, now)
            handle = self.backend.launch(spec)
        except Exception as exc:
            if entry is not None:
                self.creds.close_socket(sandbox_id)
            raise LaunchFailed(f"sandbox could not be launched: {exc}") from exc
        try:
            if handle.pid is None:
                raise ProcessLookupError("no process")
            entry.bind_process(handle.pid, os.geteuid() if handle.uid is None else handle.uid)
        except ProcessLookupError:
            # It ended before it could be bound (a container that died at once): nothing can
            # ask for the token now; the reap reports how it ended.
            log.info("%s %s ended before its credential socket was bound", kind, item_id)
        expires = int(item["expires_at"])
        entry.set_token(item["token"], expires)
        self.records.add(sandbox_id, pid=handle.pid, item=f"{kind}:{item_id}")
        if self.shipper is not None:
            self.shipper.opened(kind, item_id, log_path, int(item.get("execution") or 0))
        return Active(
            kind=kind,
            item_id=item_id,
            sandbox_id=sandbox_id,
            handle=handle,
            socket=entry,
            log_path=log_path,
            started=now,
            token_issued=now,
            token_expires=expires,
            next_refresh=self.next_refresh(now, expires),
            refreshable=kind != "trigger",
            trigger_ids=tuple(str(i) for i in item.get("trigger_ids") or ()),
        )

    def _payload(self, item: dict[str, Any]) -> tuple[bytes, float, str]:
        """What the child is given to run, its wall-clock limit and its network."""
        kind = item["kind"]
        if kind == "task":
            source = self.bundles.path_for(item.get("source_uri"))
            payload = {
                "module": item["callable"]["module"],
                "qualname": item["callable"]["qualname"],
                "path": source,
                # The claim already told us the task's context: passing it on saves every task
                # a round trip (sandbox, this supervisor, the server) before user code runs.
                "context": {
                    "attempt_id": item["id"],
                    "run_id": item["run_id"],
                    "workflow_id": item["workflow_id"],
                    "task_id": item["task_id"],
                    "try_number": item["try_number"],
                    "params": item.get("params") or {},
                    "trigger_event": item.get("trigger_event"),
                },
            }
            timeout = float(item.get("timeout") or self.settings.task_timeout)
            return json.dumps(payload).encode(), timeout, self.settings.network
        if kind == "parse":
            payload = {"path": self.bundles.path_for(item["uri"])}
            return json.dumps(payload).encode(), self.settings.parse_timeout, "none"
        paths = [self.bundles.path_for(u) for u in item.get("source_uris", [])]
        payload = {"paths": [p for p in paths if p]}
        return json.dumps(payload).encode(), self.settings.trigger_timeout, self.settings.network


__all__ = ["ENTRY_POINTS", "Active", "Backend", "Handle", "LaunchFailed", "Launcher"]
