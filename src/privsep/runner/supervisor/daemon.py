"""``runner supervisor``: the trusted middle of the credential chain.

It holds the one long-lived credential, claims work from the server, runs each item in a
sandbox, hands the sandbox its short-lived token over a per-sandbox unix socket, refreshes that
token while the item runs and reports the outcome. The loop is gunicorn's arbiter: signal
handlers only enqueue; each pass drains signals, reaps finished sandboxes, refreshes tokens
that are due, heartbeats, and claims work while there is room.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privsep.client import _surface
from privsep.runner.api.keepalive import KeepAliveClient
from privsep.runner.api.session import ApiRefused, ServerUnavailable, SupervisorApi
from privsep.runner.config.check_perms import PermissionViolation, enforce_at_start
from privsep.runner.config.loader import Config, ConfigError, load_config
from privsep.runner.errors import CommandError
from privsep.runner.sources.bundle_version import BundleVersionSource
from privsep.runner.sources.bundles import BundleStore, pinned_uri
from privsep.runner.sources.discovery import Discovery, DiscoveryError, load_sources
from privsep.runner.supervisor.loopwake import LoopWaker
from privsep.runner.supervisor.orphans import OrphanRecords
from privsep.secrets.files import InsecureFileError, make_private_dir
from privsep.secrets.keys import KeyFormatError, load_private_key

log = logging.getLogger("privsep.supervisor")

ENTRY_POINTS = {
    "task": "privsep.client._task:main",
    "parse": "privsep.client._parse:main",
    "trigger": "privsep.client._trigger:main",
}
# Claim polling: fast while work flows, backing off to this when the queue is empty.
POLL_MIN = 0.02
POLL_MAX = 1.0
# The loop waits for a wake (a sandbox ended, a report was accepted, a signal) or its next
# timer, but never longer than this: a sandbox end the watcher missed is still reaped.
LOOP_MAX_WAIT = 0.25
MAX_CLAIM = 100  # the server's ClaimRequest.max_items limit
PARSE_JOBS_PER_REQUEST = 1000  # the server's ParseJobBatchRequest limit
# A sandbox's own report of its work item's end (the REPORT rows of the sandbox surface). Once
# the server has answered one of these with a 2xx, it has ended the item (the attempt or parse
# job is no longer running), so a clean exit needs no outcome from us. Trigger sandboxes have
# no such call: they always get one.
REPORT_CALLS = _surface.REPORT_CALLS
# Outcomes the server could not take: first retry after this, doubling up to the cap.
OUTCOME_RETRY_MIN = 0.5
OUTCOME_RETRY_MAX = 5.0


@dataclass
class Active:
    """One work item running in one sandbox."""

    kind: str
    item_id: str
    sandbox_id: str
    handle: Any  # privsep.sandbox.SandboxHandle
    socket: Any  # privsep.runner.supervisor.credsock entry
    log_path: str
    started: float
    token_issued: float
    token_expires: int
    next_refresh: float
    refreshable: bool = True


@dataclass
class Unreported:
    """An outcome the server could not be told yet (it was down). Kept and sent again: the
    heartbeats keep the item's attempt "running" on the server until it hears the outcome."""

    body: dict[str, Any]
    next_try: float
    delay: float = OUTCOME_RETRY_MIN


def refresh_time(issued: float, expires: float, rng: random.Random) -> float:
    """When to refresh a token: at 50-80% of its lifetime, jittered so a fleet of sandboxes
    does not refresh in step."""
    life = max(1.0, expires - issued)
    return issued + life * rng.uniform(0.5, 0.8)


@dataclass
class SupervisorSettings:
    name: str
    server_url: str
    credential: str
    state_dir: Path
    runtime_dir: Path
    workflows_dir: Path
    parallelism: int
    heartbeat_interval: float
    drain_grace: float
    log_retention_days: float
    discovery: bool
    discovery_interval: float
    task_timeout: float
    parse_timeout: float
    trigger_timeout: float
    network: str
    launch_mode: str
    uid_first: int
    uid_count: int
    bundle_version: str = "git"  # git, none or literal:TEXT (supervisor.bundle_version)
    prewarm: int = 4
    api_socket: str = ""  # the API's unix socket, when it runs on this host ("" = TCP)
    hidden_paths: tuple[str, ...] = field(default_factory=tuple)
    discovery_sources: str = "manifest,crawl"
    backend: str = "process"  # sandbox.backend: process or container
    image: str = ""  # sandbox.image, for the container backend ("" = privsep-sandbox:<version>)

    @classmethod
    def from_config(cls, cfg: Config) -> SupervisorSettings:
        executor = str(cfg.get("supervisor.executor"))
        parallelism = int(cfg.get("supervisor.parallelism")) or (os.cpu_count() or 1)
        if executor == "sequential":
            parallelism = 1
        hidden = {
            str(cfg.home / "credentials"),
            str(cfg.home / "keys"),
            str(cfg.path_of("server.signing_keyring")),
            str(cfg.path_of("core.state_dir")),
            str(cfg.path_of("supervisor.credential")),
            str(cfg.path_of("operator.credential")),
        }
        if cfg.file_exists:
            hidden.add(str(cfg.path))
        sources = str(cfg.get("supervisor.discovery_sources"))
        try:
            load_sources(sources)
        except ValueError as exc:
            raise ConfigError(f"supervisor.discovery_sources {exc}") from None
        return cls(
            name=str(cfg.get("supervisor.name")) or socket.gethostname(),
            server_url=str(cfg.get("server.url")),
            api_socket=str(cfg.get("supervisor.api_socket")),
            credential=str(cfg.path_of("supervisor.credential")),
            state_dir=cfg.path_of("core.state_dir"),
            runtime_dir=cfg.path_of("core.runtime_dir"),
            workflows_dir=cfg.path_of("core.workflows_dir"),
            parallelism=parallelism,
            heartbeat_interval=float(cfg.get("supervisor.heartbeat_interval")),
            drain_grace=float(cfg.get("supervisor.drain_grace")),
            log_retention_days=float(cfg.get("supervisor.log_retention_days")),
            discovery=bool(cfg.get("supervisor.discovery")),
            discovery_interval=float(cfg.get("supervisor.discovery_interval")),
            discovery_sources=sources,
            task_timeout=float(cfg.get("supervisor.task_timeout")),
            parse_timeout=float(cfg.get("supervisor.parse_timeout")),
            trigger_timeout=float(cfg.get("supervisor.trigger_timeout")),
            bundle_version=str(cfg.get("supervisor.bundle_version")),
            network=str(cfg.get("sandbox.network")),
            launch_mode=str(cfg.get("sandbox.launch_mode")),
            uid_first=int(cfg.get("sandbox.uid_first")),
            uid_count=int(cfg.get("sandbox.uid_count")),
            prewarm=int(cfg.get("sandbox.prewarm")),
            backend=str(cfg.get("sandbox.backend")),
            image=str(cfg.get("sandbox.image")),
            hidden_paths=tuple(sorted(hidden)),
        )

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def work_dir(self) -> Path:
        # Not under state_dir: the whole state directory is hidden from every sandbox.
        return self.runtime_dir / "work"

    @property
    def sockets_dir(self) -> Path:
        return self.runtime_dir / "sandboxes"


class Supervisor:
    """One supervisor process. Build it, then :meth:`run` until a signal stops it."""

    def __init__(
        self, cfg: Config, settings: SupervisorSettings, *, config_path: str | None = None
    ) -> None:
        self.cfg = cfg
        self.settings = settings
        self.config_path = config_path
        self.active: dict[str, Active] = {}
        self.unreported: list[Unreported] = []
        # Sandboxes whose own report the server accepted (REPORT_CALLS). Added to by the
        # proxy threads, read and emptied by the loop; set.add/discard are atomic.
        self._reported: set[str] = set()
        self._waker = LoopWaker()
        self._cleaner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="privsep-cleanup")
        self._claim_soon = False  # set by a proxy thread: a report may have freed new work
        self._batch_parse_jobs = True  # until the server says it has no batch route
        self.draining = False
        self.stopped = False
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._rng = random.Random()  # noqa: S311 - jitter
        self._poll = POLL_MIN
        self._next_claim = 0.0
        self._next_heartbeat = 0.0
        self._next_discovery = 0.0
        self._discovery_failure = ""  # the last scan's error, logged once
        self._next_retention = 0.0
        self._next_health = 0.0
        self._drain_deadline = 0.0
        self._stop_event = threading.Event()
        self.api: SupervisorApi | None = None
        self.backend: Any = None
        self.creds: Any = None
        self.notifier: Any = None
        self.watchdog: Any = None
        self.discovery: Any = None
        self._proxy_http: KeepAliveClient | None = None  # made in start()
        self.records = OrphanRecords(settings.state_dir / "sandboxes")
        self.bundles = BundleStore(settings.runtime_dir / "bundles")
        self.bundle_source = BundleVersionSource(settings.workflows_dir)

    # --- start-up -----------------------------------------------------------------------------

    def start(self) -> None:
        """The issue's order: check-perms (strict), load the credential, become
        non-dumpable, then open a session with the server (retrying with backoff)."""
        from privsep.runner.supervisor import systemd
        from privsep.runner.supervisor.credsock import CredentialServer
        from privsep.sandbox import set_non_dumpable

        enforce_at_start(self.cfg, "supervisor")
        key = load_private_key(self.settings.credential)
        set_non_dumpable()
        self.notifier = systemd.Notifier.from_environ()
        interval = systemd.watchdog_interval(os.environ)
        systemd.scrub_environ(os.environ)
        if self.notifier and interval:
            self.watchdog = systemd.LoopWatchdog(self.notifier, interval)
        for d in (self.settings.state_dir, self.settings.logs_dir):
            make_private_dir(str(d))
        # Search-only (no listing) for others: a sandbox uid must traverse to its own socket
        # and work directories, which are 0700 and its own; it cannot see which others exist.
        for d in (self.settings.runtime_dir, self.settings.sockets_dir, self.settings.work_dir):
            make_private_dir(str(d))
            os.chmod(d, 0o711)  # noqa: S103
        killed = self.records.reap_orphans()
        if killed:
            log.warning("killed %d sandbox processes left over from an earlier run", killed)
        try:
            self.api = SupervisorApi(
                self.settings.server_url,
                self.settings.name,
                key,
                unix_socket=self.settings.api_socket or None,
            )
            # Proxied sandbox calls: 10 s, under the client SDK's own 10 s + 5 s wait.
            self._proxy_http = KeepAliveClient(
                self.settings.server_url, timeout=10, unix_socket=self.settings.api_socket or None
            )
        except ValueError as exc:
            raise CommandError(f"server.url: {exc}") from None
        if self.notifier:
            self.notifier.status("opening a session with the server")
        if not self.api.open_session_with_backoff(self._stop_event):
            raise CommandError("stopped before a session with the server could be opened")
        # Anything the server still thinks we run died with our previous process.
        self.api.call("POST", "/v1/supervisor/restarted", None)
        self.backend = self._make_backend()
        self.creds = CredentialServer(proxy_handler=self._proxy, on_violation=self._on_violation)
        self.creds.start()
        if self.settings.discovery:
            self.discovery = Discovery(
                self.settings.workflows_dir,
                self.settings.state_dir / "discovery.json",
                load_sources(self.settings.discovery_sources),
            )
        log.info(
            "supervisor %s started: %s, parallelism %d",
            self.settings.name,
            self.backend.describe(),
            self.settings.parallelism,
        )
        if self.watchdog:
            self.watchdog.start()
        if self.notifier:
            self.notifier.ready(status=f"running, parallelism {self.settings.parallelism}")

    def _make_backend(self) -> Any:
        """The ``sandbox.backend`` the configuration names; a host that cannot run it is a
        one-line error (no engine, no image, no SDK), not a traceback."""
        from privsep.sandbox import ProcessBackend, SandboxUnavailable, UidPool

        pool = UidPool(self.settings.uid_first, self.settings.uid_count)
        try:
            if self.settings.backend == "container":
                from privsep.sandbox.container import ContainerBackend

                return ContainerBackend(
                    image=self.settings.image or None,
                    uid_pool=pool,
                    log_dir=str(self.settings.logs_dir),
                    supervisor=self.settings.name,
                )
            return ProcessBackend(
                launch_mode=self.settings.launch_mode,  # type: ignore[arg-type]
                uid_pool=pool,
                log_dir=str(self.settings.logs_dir),
                prewarm=self.settings.prewarm,
            )
        except SandboxUnavailable as exc:
            raise CommandError(str(exc).removeprefix("privsep: ")) from None

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._waker.wake_on_signals()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.put_nowait(signum)  # no logging, no I/O, no locks

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        self.start()
        try:
            while not self.stopped:
                self.run_once()
        finally:
            self.shutdown()
        return 0

    def run_once(self) -> None:
        """One pass of the loop. Public so tests can turn it by hand."""
        self._handle_signals()
        self._reap()
        now = time.monotonic()
        if self.unreported:
            self._report_again(now)
        self._refresh_due()
        if now >= self._next_heartbeat:
            self._heartbeat()
        if self.discovery is not None and now >= self._next_discovery and not self.draining:
            self._discover()
        if now >= self._next_retention:
            self._apply_retention()
        if self._claim_soon:
            self._claim_soon = False
            self._poll = POLL_MIN
            self._next_claim = 0.0
        if self.draining:
            self._drain_step()
        elif now >= self._next_claim and len(self.active) < self.settings.parallelism:
            self._claim()
        if self.watchdog:
            self.watchdog.tick()
        if now >= self._next_health:
            self._next_health = now + 1.0
            self._write_health()
        self._waker.wait(self._wait_time())

    def _wait_time(self) -> float:
        """Seconds until the earliest timer of the loop; 0 if one is due already."""
        now = time.monotonic()
        due = [now + LOOP_MAX_WAIT, self._next_heartbeat, self._next_health, self._next_retention]
        if self.watchdog:
            due.append(now + self.watchdog.max_tick_age / 4)
        if self.draining:
            due.append(self._drain_deadline)
        elif len(self.active) < self.settings.parallelism:
            due.append(self._next_claim)
        if self.discovery is not None and not self.draining:
            due.append(self._next_discovery)
        if self.unreported:
            due.append(min(p.next_try for p in self.unreported))
        refresh = [i.next_refresh for i in self.active.values() if i.refreshable]
        if refresh:
            due.append(now + min(refresh) - time.time())
        return max(0.0, min(due) - now)

    def _write_health(self) -> None:
        from privsep.runner.supervisor.health import write_heartbeat

        try:
            write_heartbeat(
                str(self.settings.state_dir),
                pid=os.getpid(),
                detail={"active": len(self.active), "draining": self.draining},
            )
        except OSError as exc:  # a full disk must not stop the loop; runner health will say
            log.warning("cannot write the health record: %s", exc)

    def _handle_signals(self) -> None:
        while True:
            try:
                sig = self._signals.get_nowait()
            except queue.Empty:
                return
            if sig in (signal.SIGTERM, signal.SIGINT):
                if not self.draining:
                    log.info(
                        "draining: no new claims; running work has %.0f s to finish",
                        self.settings.drain_grace,
                    )
                    self.draining = True
                    self._drain_deadline = time.monotonic() + self.settings.drain_grace
                    if self.notifier:
                        self.notifier.stopping()
                elif sig == signal.SIGINT:
                    self._drain_deadline = 0  # a second Ctrl-C: stop now
            elif sig == signal.SIGHUP:
                self._reload()

    def _reload(self) -> None:
        try:
            cfg = load_config(self.config_path)
            settings = SupervisorSettings.from_config(cfg)
        except Exception as exc:  # keep running on the old configuration
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        self.cfg = cfg
        for name in (
            "parallelism",
            "heartbeat_interval",
            "drain_grace",
            "log_retention_days",
            "discovery_interval",
            "discovery_sources",
            "task_timeout",
            "parse_timeout",
            "trigger_timeout",
            "network",
            "bundle_version",
        ):
            setattr(self.settings, name, getattr(settings, name))
        if self.discovery is not None:
            self.discovery.sources = load_sources(settings.discovery_sources)
        self._next_retention = 0.0  # apply a changed log retention now, not within the hour
        log.info("SIGHUP: configuration reloaded (parallelism %d)", self.settings.parallelism)

    def _drain_step(self) -> None:
        if not self.active:
            self.stopped = True
            return
        if time.monotonic() >= self._drain_deadline:
            for item in list(self.active.values()):
                item.handle.kill(grace=0)

    # --- claiming and launching -----------------------------------------------------------------

    def _claim(self) -> None:
        assert self.api is not None  # noqa: S101 - set in start()
        # The server takes at most MAX_CLAIM items per request; larger pools refill over
        # several passes (the next claim comes at once when this one returned work).
        room = min(MAX_CLAIM, self.settings.parallelism - len(self.active))
        try:
            body = self.api.call(
                "POST",
                "/v1/supervisor/claim",
                {"kinds": ["task", "parse", "trigger"], "max_items": room},
            )
        except (ServerUnavailable, ApiRefused) as exc:
            log.warning("claim failed: %s", exc)
            self._poll = min(POLL_MAX, self._poll * 2)
            self._next_claim = time.monotonic() + self._poll
            return
        items = body.get("items", []) if isinstance(body, dict) else []
        for item in items:
            self._launch(item)
        self._poll = POLL_MIN if items else min(POLL_MAX, self._poll * 1.5)
        self._next_claim = time.monotonic() + (0 if items else self._poll)

    def _payload(self, item: dict[str, Any]) -> tuple[bytes, float, str]:
        kind = item["kind"]
        if kind == "task":
            source = self.bundles.path_for(item.get("source_uri"))
            payload = {
                "module": item["callable"]["module"],
                "qualname": item["callable"]["qualname"],
                "path": source,
            }
            timeout = float(item.get("timeout") or self.settings.task_timeout)
            return json.dumps(payload).encode(), timeout, self.settings.network
        if kind == "parse":
            payload = {"path": self.bundles.path_for(item["uri"])}
            return json.dumps(payload).encode(), self.settings.parse_timeout, "none"
        paths = [self.bundles.path_for(u) for u in item.get("source_uris", [])]
        payload = {"paths": [p for p in paths if p]}
        return json.dumps(payload).encode(), self.settings.trigger_timeout, self.settings.network

    def _launch(self, item: dict[str, Any]) -> None:
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
            handle = self.backend.launch(spec)
        except Exception as exc:
            log.error("cannot launch %s %s: %s", kind, item_id, exc)
            if entry is not None:
                self.creds.close_socket(sandbox_id)
            self._report(kind, item_id, None, f"sandbox could not be launched: {exc}")
            return
        uid = getattr(handle, "uid", None)
        try:
            if handle.pid is None:
                raise ProcessLookupError("no process")
            entry.bind_process(handle.pid, os.geteuid() if uid is None else uid)
        except ProcessLookupError:
            # It ended before it could be bound (a container that died at once): nothing can
            # ask for the token now; the reap below reports how it ended.
            log.info("%s %s ended before its credential socket was bound", kind, item_id)
        entry.set_token(item["token"], int(item["expires_at"]))
        self.records.add(sandbox_id, pid=handle.pid, item=f"{kind}:{item_id}")
        now = time.time()
        self.active[sandbox_id] = Active(
            kind=kind,
            item_id=item_id,
            sandbox_id=sandbox_id,
            handle=handle,
            socket=entry,
            log_path=log_path,
            started=now,
            token_issued=now,
            token_expires=int(item["expires_at"]),
            next_refresh=refresh_time(now, int(item["expires_at"]), self._rng),
            refreshable=kind != "trigger",
        )
        self._waker.watch(handle)

    # --- running work -----------------------------------------------------------------------------

    def _refresh_due(self) -> None:
        assert self.api is not None  # noqa: S101
        now = time.time()
        for item in list(self.active.values()):
            if not item.refreshable or now < item.next_refresh or item.handle.status is not None:
                continue
            try:
                body = self.api.call(
                    "POST", "/v1/supervisor/refresh", {"kind": item.kind, "id": item.item_id}
                )
            except ServerUnavailable as exc:
                log.warning(
                    "token refresh for %s %s failed (%s); retrying", item.kind, item.item_id, exc
                )
                item.next_refresh = now + 1.0
                continue
            except ApiRefused as exc:
                log.info("token of %s %s not refreshed: %s", item.kind, item.item_id, exc.code)
                item.refreshable = False
                continue
            item.socket.set_token(body["token"], int(body["expires_at"]))
            item.token_issued = now
            item.token_expires = int(body["expires_at"])
            item.next_refresh = refresh_time(now, item.token_expires, self._rng)

    def _reap(self) -> None:
        """Finish every sandbox that ended: the socket stops answering, the outcome goes to
        the server (which ends the attempt, so its token dies), the records go."""
        for sandbox_id, item in list(self.active.items()):
            status = item.handle.status
            if status is None:
                continue
            del self.active[sandbox_id]
            item.socket.end()  # from here on its token is gone and proxying out of turn
            self._cleaner.submit(self._clean_up, sandbox_id)
            self.records.remove(sandbox_id)
            reported = sandbox_id in self._reported
            self._reported.discard(sandbox_id)
            if reported and getattr(status, "ok", False):
                # The server heard the sandbox's own report and ended the item; an outcome
                # now would only be ignored (it cost a request and a write transaction).
                log.debug("%s %s reported its own outcome", item.kind, item.item_id)
            else:
                code = getattr(status, "exit_code", None)
                reason = "" if code == 0 else str(getattr(status, "detail", "") or status)
                self._report(item.kind, item.item_id, code, reason)
            self._poll = POLL_MIN  # a finished task may have made its downstream runnable
            self._next_claim = 0.0

    def _clean_up(self, sandbox_id: str) -> None:
        """Off the loop: remove an ended sandbox's socket and work directory. Both were
        mount points in its (dying) mount namespace, and removing one can wait in the kernel
        for that namespace's mounts to be detached: milliseconds the loop need not spend."""
        try:
            self.creds.close_socket(sandbox_id)
        except Exception:
            log.error("cannot close the credential socket of %s", sandbox_id, exc_info=True)
        shutil.rmtree(self.settings.work_dir / sandbox_id, ignore_errors=True)

    def _report(self, kind: str, item_id: str, exit_code: int | None, reason: str) -> None:
        assert self.api is not None  # noqa: S101
        body = {
            "kind": kind,
            "id": item_id,
            "exit_code": exit_code,
            "reason": reason[:4000] or ("" if exit_code == 0 else "sandbox failed"),
        }
        if exit_code == 0:
            body["reason"] = "sandbox exited without reporting an outcome"
        if not self._send_outcome(body):
            log.warning(
                "outcome of %s %s not reported: the server is unavailable; will retry",
                kind,
                item_id,
            )
            self.unreported.append(Unreported(body, time.monotonic() + OUTCOME_RETRY_MIN))

    def _send_outcome(self, body: dict[str, Any]) -> bool:
        """One try, never blocking the loop on a retry: True once the server has answered
        (taken or refused), False if it could not be reached."""
        assert self.api is not None  # noqa: S101
        try:
            self.api.call("POST", "/v1/supervisor/outcome", body)
        except ServerUnavailable:
            return False
        except ApiRefused as exc:
            log.warning("outcome of %s %s refused: %s", body["kind"], body["id"], exc)
        return True

    def _report_again(self, now: float) -> None:
        """Send the outcomes the server missed; stop at the first failure (it is still down)."""
        for pending in list(self.unreported):
            if now < pending.next_try:
                continue
            if not self._send_outcome(pending.body):
                for later in self.unreported:
                    later.delay = min(OUTCOME_RETRY_MAX, later.delay * 2)
                    later.next_try = max(later.next_try, now + later.delay)
                return
            self.unreported.remove(pending)
            log.info("outcome of %s %s reported late", pending.body["kind"], pending.body["id"])

    def _heartbeat(self) -> None:
        assert self.api is not None  # noqa: S101
        self._next_heartbeat = time.monotonic() + self.settings.heartbeat_interval
        try:
            self.api.call("POST", "/v1/supervisor/heartbeat", None)
        except (ServerUnavailable, ApiRefused) as exc:
            log.warning("heartbeat failed: %s", exc)

    def _discover(self) -> None:
        assert self.api is not None  # noqa: S101
        self._next_discovery = time.monotonic() + self.settings.discovery_interval
        try:
            changes = self.discovery.scan()
        except DiscoveryError as exc:
            # Nothing is reported, so nothing is deleted: a broken manifest must not read as
            # "every workflow is gone". Said once, not at every scan.
            if str(exc) != self._discovery_failure:
                log.error("discovery found nothing this time: %s", exc)
            self._discovery_failure = str(exc)
            return
        if self._discovery_failure:
            log.info("discovery works again")
            self._discovery_failure = ""
        try:
            jobs = []
            # Once per scan, and only when there is something to stamp with it.
            bundle = (
                self.bundle_source.read(self.settings.bundle_version) if changes.changed else ""
            )
            for path, digest in changes.changed:
                self.bundles.keep(path, digest, changes.contents[digest])
                job: dict[str, Any] = {
                    "uri": pinned_uri(path, digest),
                    "content_hash": digest,
                    "bundle_version": bundle,
                }
                ids = changes.workflow_ids(path)
                if ids is not None:  # the manifest's assignment, which the server enforces
                    job["workflow_ids"] = list(ids)
                jobs.append(job)
            self._batch_parse_jobs = queue_parse_jobs(self.api, jobs, batch=self._batch_parse_jobs)
            if changes.deleted:
                self.api.call(
                    "POST",
                    "/v1/supervisor/deleted-files",
                    {"uris": [Path(p).as_uri() for p in changes.deleted]},
                )
            self.discovery.commit(changes)
        except (ServerUnavailable, ApiRefused) as exc:
            log.warning("discovery could not reach the server (%s); will rescan", exc)

    def _apply_retention(self) -> None:
        self._next_retention = time.monotonic() + 3600
        days = self.settings.log_retention_days
        if days <= 0:
            return
        cutoff = time.time() - days * 86400
        self.bundles.prune(days * 86400, time.time())
        for entry in os.scandir(self.settings.logs_dir):
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                continue

    # --- callbacks from the credential server (its thread) -----------------------------------

    def _proxy(
        self, sandbox_id: str, method: str, path: str, body: Any, token: str
    ) -> tuple[int, Any]:
        """Forward one sandbox's API call, on the calling pool thread's kept connection, and
        note an accepted report of the item's end (see :data:`REPORT_CALLS`).
        :class:`~privsep.runner.api.keepalive.HttpUnavailable` is an OSError: the credential
        server turns it into ``server_unavailable`` for the child."""
        assert self._proxy_http is not None  # noqa: S101 - set in start(), before creds
        reply = self._proxy_http.request(method, path, body, token=token)
        if 200 <= reply.status < 300 and (method, path) in REPORT_CALLS:
            self._reported.add(sandbox_id)
            # Its downstream may be runnable now: claim at once, not at the next poll.
            self._claim_soon = True
            self._waker.wake()
        return reply.status, reply.data

    def _on_violation(self, sandbox_id: str, reason: str) -> None:
        item = self.active.get(sandbox_id)
        log.warning("sandbox %s broke the credential protocol (%s): killing it", sandbox_id, reason)
        if item is not None:
            item.handle.kill(grace=0)

    # --- shutdown -------------------------------------------------------------------------------

    def shutdown(self) -> None:
        for item in list(self.active.values()):
            item.handle.kill(grace=0)
        deadline = time.monotonic() + 10
        while self.active and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        if self.unreported and self.api is not None:
            self._report_again(float("inf"))
            for pending in self.unreported:
                log.error(
                    "outcome of %s %s never reached the server; it ends the item when this "
                    "supervisor starts again",
                    pending.body["kind"],
                    pending.body["id"],
                )
        if self.watchdog:
            self.watchdog.stop()
        self._cleaner.shutdown(wait=True)
        if self.creds is not None:
            self.creds.stop()
        if self.backend is not None:
            self.backend.close()
        if self.api is not None:
            self.api.close()
        if self._proxy_http is not None:
            self._proxy_http.close()
        self._waker.close()


def queue_parse_jobs(api: SupervisorApi, jobs: list[dict[str, str]], *, batch: bool) -> bool:
    """Queue a parse of each changed file: one request per :data:`PARSE_JOBS_PER_REQUEST`
    files, not one per file (a checkout or a first scan changes thousands at once).

    ``batch=False``, or a server without the batch route (older than this supervisor), sends
    them one by one. Returns whether to batch next time.
    """
    for start in range(0, len(jobs), PARSE_JOBS_PER_REQUEST):
        chunk = jobs[start : start + PARSE_JOBS_PER_REQUEST]
        if len(chunk) > 1 and batch:
            try:
                api.call("POST", "/v1/supervisor/parse-jobs/batch", {"jobs": chunk})
                continue
            except ApiRefused as exc:
                if exc.status not in (404, 405):
                    raise
                batch = False
                log.info("the server has no batch parse-job route: queueing files one by one")
        for job in chunk:
            api.call("POST", "/v1/supervisor/parse-jobs", job)
    return batch


def run_supervisor(cfg: Config, *, config_path: str | None, daemon: bool = False) -> int:
    """The ``runner supervisor`` command."""
    settings = SupervisorSettings.from_config(cfg)
    if daemon:
        from privsep.runner.supervisor.daemonize import daemonize

        make_private_dir(str(settings.state_dir))
        ctx = daemonize(
            str(settings.state_dir / "supervisor.pid"), str(settings.state_dir / "supervisor.log")
        )
        with ctx:
            return _run(cfg, settings, config_path)
    return _run(cfg, settings, config_path)


def _run(cfg: Config, settings: SupervisorSettings, config_path: str | None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    sup = Supervisor(cfg, settings, config_path=config_path)
    sup.install_signal_handlers()
    try:
        return sup.run()
    except PermissionViolation as exc:
        print(
            f"{exc}\nrunner: refusing to start the supervisor: fix the permissions above "
            "(runner check-perms shows them)",
            file=sys.stderr,
        )
        return 1
    except FileNotFoundError as exc:
        raise CommandError(
            f"supervisor credential {exc.filename} does not exist; create it "
            "with `runner credentials create --out PATH`"
        ) from None
    except InsecureFileError as exc:
        raise CommandError(f"refusing the supervisor credential: {exc}") from None
    except KeyFormatError as exc:
        raise CommandError(str(exc)) from None
