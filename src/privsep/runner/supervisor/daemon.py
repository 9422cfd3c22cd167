"""``runner supervisor``: the trusted middle of the credential chain, and its loop.

It holds the one long-lived credential, claims work from the server, runs each item in a
sandbox, hands the sandbox its short-lived token over a per-sandbox unix socket, refreshes that
token while the item runs and reports the outcome. The loop is gunicorn's arbiter: signal
handlers only enqueue, and each pass dispatches the queued signals to named handlers, reaps
finished sandboxes, then runs each of its timed chores that is due. The chores are one table
(:attr:`Supervisor._chores`): the pass runs the due ones and the wait until the next pass reads
the same table, so a timer cannot be run without being waited for, or the other way round.

Launching lives in :mod:`~privsep.runner.supervisor.launch`, outcomes in
:mod:`~privsep.runner.supervisor.outcomes`, settings in
:mod:`~privsep.runner.supervisor.settings`; this module is the loop that drives them.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privsep.runner.api.failover import FailoverClient
from privsep.runner.api.session import ApiRefused, ServerUnavailable, SupervisorApi
from privsep.runner.config.check_perms import PermissionViolation, enforce_at_start
from privsep.runner.config.loader import Config, load_config
from privsep.runner.errors import CommandError
from privsep.runner.sources.bundle_version import BundleVersionSource
from privsep.runner.sources.bundles import BundleStore, pinned_uri
from privsep.runner.sources.discovery import Discovery, DiscoveryError, load_sources
from privsep.runner.supervisor import metrics
from privsep.runner.supervisor.credsock import CredentialServer
from privsep.runner.supervisor.discovery_reports import queue_parse_jobs, report_deleted
from privsep.runner.supervisor.heartbeat import DiscoveryHealth
from privsep.runner.supervisor.launch import (
    Active,
    Backend,
    Launcher,
    LaunchFailed,
    make_backend,
)
from privsep.runner.supervisor.logship import LogShipper
from privsep.runner.supervisor.loopwake import LoopWaker, StopOnTerm
from privsep.runner.supervisor.orphans import OrphanRecords
from privsep.runner.supervisor.outcomes import Outcomes
from privsep.runner.supervisor.sessions import supervisor_api
from privsep.runner.supervisor.settings import SupervisorSettings
from privsep.runner.supervisor.statelock import hold_state_lock
from privsep.runner.supervisor.wakeups import WakeupConsumer
from privsep.secrets.files import InsecureFileError, make_private_dir

if TYPE_CHECKING:
    from privsep.runner.supervisor.systemd import LoopWatchdog, Notifier

log = logging.getLogger("privsep.supervisor")

# Claim polling: fast while work flows, backing off to supervisor.poll_interval when the queue
# is empty; a claim that failed backs off to POLL_MAX at most.
POLL_MIN = 0.02
POLL_MAX = 1.0
# The loop waits for a wake (a sandbox ended, a report was accepted, a signal) or its next
# timer, but never longer than this: a sandbox end the watcher missed is still reaped.
LOOP_MAX_WAIT = 0.25
MAX_CLAIM = 100  # the server's ClaimRequest.max_items limit
HEALTH_INTERVAL = 1.0
RETENTION_INTERVAL = 3600.0
NEVER = float("inf")
# What each cgroup controller the backend may lack would have enforced, for the start-up log.
UNENFORCED_MEANING = {
    "memory": "the whole-sandbox memory limit",
    "pids": "the whole-sandbox process count limit",
}


@dataclass(frozen=True)
class Chore:
    """One timed duty of the loop: when it is next due (monotonic seconds, :data:`NEVER`
    while it has nothing to do) and what doing it means."""

    name: str
    due: Callable[[], float]
    run: Callable[[], None]


class Supervisor:
    """One supervisor process. Build it, then :meth:`run` until a signal stops it."""

    def __init__(
        self, cfg: Config, settings: SupervisorSettings, *, config_path: str | None = None
    ) -> None:
        self.cfg = cfg
        self.settings = settings
        self.config_path = config_path
        self.active: dict[str, Active] = {}
        self._waker = LoopWaker()
        self._cleaner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="privsep-cleanup")
        self._claim_soon = False  # set by a proxy thread: a report may have freed new work
        self._batch_parse_jobs = True  # until the server says it has no batch route
        self.draining = False
        self.stopped = False
        self._signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._signal_handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_int,
            signal.SIGHUP: self.handle_hup,
        }
        self._poll = POLL_MIN
        self._next_claim = 0.0
        self._next_heartbeat = 0.0
        self._next_discovery = 0.0
        self.discovery_health = DiscoveryHealth(settings.discovery)
        self._next_retention = 0.0
        self._next_health = 0.0
        self._next_watchdog = 0.0
        self._drain_deadline = 0.0
        self.api: SupervisorApi | None = None
        self.outcomes: Outcomes | None = None
        self.backend: Backend | None = None
        self.creds: CredentialServer | None = None
        self.launcher: Launcher | None = None
        self.shipper: LogShipper | None = None
        self._metrics: metrics.Listener | None = None
        self.notifier: Notifier | None = None
        self.watchdog: LoopWatchdog | None = None
        self.discovery: Discovery | None = None
        self.wakeups: WakeupConsumer | None = None
        self._proxy_http: FailoverClient | None = None  # made in start()
        self.records = OrphanRecords(settings.state_dir / "sandboxes")
        self.bundles = BundleStore(settings.runtime_dir / "bundles")
        self.bundle_source = BundleVersionSource(settings.workflows_dir)
        # In the order a pass runs them (the order the original loop had: outcomes the
        # server missed first, then tokens, then the server's view of us, then new work).
        self._chores: tuple[Chore, ...] = (
            Chore("outcomes", self._outcomes_due, self._report_again),
            Chore("refresh", self._refresh_at, self._refresh_due),
            Chore("heartbeat", lambda: self._next_heartbeat, self._heartbeat),
            Chore("discovery", self._discovery_due, self._discover),
            Chore("retention", lambda: self._next_retention, self._apply_retention),
            Chore("drain", self._drain_due, self._drain_step),
            Chore("claim", self._claim_due, self._claim),
            Chore("watchdog", self._watchdog_due, self._tick_watchdog),
            Chore("health", lambda: self._next_health, self._write_health),
        )

    # --- start-up -----------------------------------------------------------------------------

    def start(self) -> None:
        """Check permissions (strict) before the credential is read, so a readable
        credential is never loaded; become non-dumpable once it is in memory; scrub the
        systemd variables before any child can inherit them; then open a session with the
        server (retrying with backoff)."""
        from privsep.runner.supervisor import systemd
        from privsep.sandbox import set_non_dumpable

        enforce_at_start(self.cfg, "supervisor")
        self.api = supervisor_api(self.settings)  # reads the key, unless a refresher holds it
        set_non_dumpable()
        self.notifier = systemd.Notifier.from_environ()
        interval = systemd.watchdog_interval(os.environ)
        systemd.scrub_environ(os.environ)
        if self.notifier and interval:
            self.watchdog = systemd.LoopWatchdog(self.notifier, interval)
        for d in (self.settings.state_dir, self.settings.logs_dir):
            make_private_dir(str(d))
        # First, before the orphan records, the cgroups or the server hear from us.
        self._state_lock = hold_state_lock(self.settings.state_dir)
        # Search-only (no listing) for others: a sandbox uid must traverse to its own socket
        # and work directories, which are 0700 and its own; it cannot see which others exist.
        for d in (self.settings.runtime_dir, self.settings.sockets_dir, self.settings.work_dir):
            make_private_dir(str(d))
            os.chmod(d, 0o711)  # noqa: S103
        # Before the session: a port already taken stops the supervisor before any work.
        self._metrics = metrics.serve(self.settings.metrics_bind)
        killed = self.records.reap_orphans()
        if killed:
            log.warning("killed %d sandbox processes left over from an earlier run", killed)
        # Proxied sandbox calls: 10 s, under the client SDK's own 10 s + 5 s wait. They fail
        # over too: a task's own report must reach a live replica.
        self._proxy_http = FailoverClient(
            self.settings.server_urls, timeout=10, unix_socket=self.settings.api_socket or None
        )
        self.outcomes = Outcomes(self.api)
        if self.notifier:
            self.notifier.status("opening a session with the server")
        if not self.api.open_session_with_backoff(StopOnTerm(self._waker, self._signals)):
            raise CommandError("stopped before a session with the server could be opened")
        # Anything the server still thinks we run died with our previous process.
        self.api.call("POST", "/v1/supervisor/restarted", None)
        self.backend = make_backend(self.settings)
        # The credential sockets run on the backend's reactor, which already watches every
        # sandbox's pipes and deadlines: one selector loop in the supervisor, not two.
        self.creds = CredentialServer(
            reactor=self.backend._reactor,
            proxy_handler=self._proxy,
            on_violation=self._on_violation,
        )
        self.creds.start()
        self.shipper = LogShipper(self.api, self.settings.state_dir / "logship")
        self.shipper.start()
        self.launcher = Launcher(
            self.settings, self.backend, self.creds, self.bundles, self.records, self.shipper
        )
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
        unenforced = self.backend.unenforced_limits()
        if unenforced:
            log.warning(
                "sandbox limits NOT enforced here: %s; no writable cgroup controller for %s "
                "(each process keeps its rlimits, and the PID namespace ends with the sandbox)",
                " and ".join(UNENFORCED_MEANING[name] for name in unenforced),
                "/".join(unenforced),
            )
        self.wakeups = WakeupConsumer.started_for(self.settings, on_wakeup=self._claim_now)
        if self.watchdog:
            self.watchdog.start()
        if self.notifier:
            self.notifier.ready(status=f"running, parallelism {self.settings.parallelism}")

    # --- signals: the handler only enqueues; the loop dispatches -------------------------------

    def install_signal_handlers(self) -> None:
        for sig in self._signal_handlers:
            signal.signal(sig, self._on_signal)
        self._waker.wake_on_signals()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.put_nowait(signum)  # no logging, no I/O, no locks

    def _dispatch_signals(self) -> None:
        while True:
            try:
                sig = self._signals.get_nowait()
            except queue.Empty:
                return
            self._signal_handlers[sig]()

    def handle_term(self) -> None:
        """SIGTERM: drain (no new claims; running work has ``drain_grace`` to finish)."""
        if self.draining:
            return
        log.info(
            "draining: no new claims; running work has %.0f s to finish",
            self.settings.drain_grace,
        )
        self.draining = True
        self._drain_deadline = time.monotonic() + self.settings.drain_grace
        if self.notifier:
            self.notifier.stopping()

    def handle_int(self) -> None:
        """SIGINT: drain like SIGTERM; a second one (Ctrl-C again) stops now."""
        if self.draining:
            self._drain_deadline = 0
        else:
            self.handle_term()

    def handle_hup(self) -> None:
        """SIGHUP: re-read the configuration; keep the old one if the new one is bad."""
        try:
            cfg = load_config(self.config_path)
            settings = SupervisorSettings.from_config(cfg)
        except Exception as exc:  # keep running on the old configuration
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        self.cfg = cfg
        self.settings.reload_from(settings)
        if self.discovery is not None:
            self.discovery.sources = load_sources(settings.discovery_sources)
        self._next_retention = 0.0  # apply a changed log retention now, not within the hour
        log.info("SIGHUP: configuration reloaded (parallelism %d)", self.settings.parallelism)

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
        self._dispatch_signals()
        self._reap()
        if self._claim_soon:
            self._claim_soon = False
            self._poll = POLL_MIN
            self._next_claim = 0.0
        now = time.monotonic()
        for chore in self._chores:
            if now >= chore.due():
                chore.run()
        self._waker.wait(self._wait_time())

    def _wait_time(self) -> float:
        """Seconds until the earliest chore is due; 0 if one is due already."""
        now = time.monotonic()
        return max(0.0, min(now + LOOP_MAX_WAIT, *(c.due() for c in self._chores)) - now)

    # --- when each chore is due ----------------------------------------------------------------

    def _outcomes_due(self) -> float:
        return self.outcomes.next_retry() if self.outcomes is not None else NEVER

    def _refresh_at(self) -> float:
        refresh = [i.next_refresh for i in self.active.values() if i.refreshable]
        if not refresh:
            return NEVER
        return time.monotonic() + min(refresh) - time.time()  # wall-clock times, made monotonic

    def _discovery_due(self) -> float:
        if self.discovery is None or self.draining:
            return NEVER
        return self._next_discovery

    def _drain_due(self) -> float:
        if not self.draining:
            return NEVER
        return self._drain_deadline if self.active else 0.0  # nothing left: stop at once

    def _claim_due(self) -> float:
        if self.draining or len(self.active) >= self.settings.parallelism:
            return NEVER
        return self._next_claim

    def _watchdog_due(self) -> float:
        return self._next_watchdog if self.watchdog else NEVER

    # --- the chores ----------------------------------------------------------------------------

    def _tick_watchdog(self) -> None:
        # A tick at least every quarter of the watchdog's allowed age keeps its pings going
        # with room for one slow pass.
        assert self.watchdog is not None  # noqa: S101 - due only with a watchdog
        self.watchdog.tick()
        self._next_watchdog = time.monotonic() + self.watchdog.max_tick_age / 4

    def _write_health(self) -> None:
        from privsep.runner.supervisor.health import write_heartbeat

        self._next_health = time.monotonic() + HEALTH_INTERVAL
        try:
            write_heartbeat(
                str(self.settings.state_dir),
                pid=os.getpid(),
                detail={"active": len(self.active), "draining": self.draining},
            )
        except OSError as exc:  # a full disk must not stop the loop; runner health will say
            log.warning("cannot write the health record: %s", exc)

    def _drain_step(self) -> None:
        if not self.active:
            self.stopped = True
            return
        for item in list(self.active.values()):
            item.handle.kill(grace=0)

    def _report_again(self) -> None:
        assert self.outcomes is not None  # noqa: S101 - due only once set
        self.outcomes.retry(time.monotonic())

    def _claim(self) -> None:
        assert self.api is not None  # noqa: S101 - set in start()
        # The server takes at most MAX_CLAIM items per request; larger pools refill over
        # several passes (the next claim comes at once when this one returned work).
        room = min(MAX_CLAIM, self.settings.parallelism - len(self.active))
        try:
            body = self.api.call(
                "POST",
                "/v1/supervisor/claim",
                {
                    "kinds": ["task", "parse", "trigger"],
                    "max_items": room,
                    "queues": list(self.settings.queues),
                },
            )
        except (ServerUnavailable, ApiRefused) as exc:
            metrics.claimed(None)
            log.warning("claim failed: %s", exc)
            self._poll = min(POLL_MAX, self._poll * 2)
            wait = exc.not_before(self._poll) if isinstance(exc, ServerUnavailable) else self._poll
            self._next_claim = time.monotonic() + wait
            return
        items = body.get("items", []) if isinstance(body, dict) else []
        metrics.claimed(items)
        for item in items:
            self._launch(item)
        if items:
            self._poll = POLL_MIN
        elif self.wakeups is not None:  # a wake-up claims at once: the poll is the fallback
            self._poll = self.settings.poll_interval
        else:
            self._poll = min(self.settings.poll_interval, self._poll * 1.5)
        self._next_claim = time.monotonic() + (0 if items else self._poll)

    def _launch(self, item: dict[str, Any]) -> None:
        assert self.launcher is not None and self.outcomes is not None  # noqa: S101
        try:
            active = self.launcher.launch(item, time.time())
        except LaunchFailed as exc:
            log.error("cannot launch %s %s: %s", item["kind"], item["id"], exc.__cause__)
            self.outcomes.report(item["kind"], item["id"], None, str(exc))
            return
        self.active[active.sandbox_id] = active
        metrics.running(self.active.values())
        self._waker.watch(active.handle)

    def _refresh_due(self) -> None:
        assert self.api is not None and self.launcher is not None  # noqa: S101
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
            item.next_refresh = self.launcher.next_refresh(now, item.token_expires)

    # --- every pass ----------------------------------------------------------------------------

    def _reap(self) -> None:
        """Finish every sandbox that ended: the socket stops answering, the outcome goes to
        the server (which ends the attempt, so its token dies), the records go."""
        for sandbox_id, item in list(self.active.items()):
            status = item.handle.status
            if status is None:
                continue
            del self.active[sandbox_id]
            metrics.running(self.active.values())
            item.socket.end()  # from here on its token is gone and proxying out of turn
            self._cleaner.submit(self._clean_up, sandbox_id)
            self.records.remove(sandbox_id)
            assert self.outcomes is not None and self.shipper is not None  # noqa: S101
            self.shipper.closed(item.kind, item.item_id)
            self.outcomes.finished(sandbox_id, item.kind, item.item_id, status)
            self._poll = POLL_MIN  # a finished task may have made its downstream runnable
            self._next_claim = 0.0

    def _clean_up(self, sandbox_id: str) -> None:
        """Off the loop: remove an ended sandbox's socket and work directory. Both were
        mount points in its (dying) mount namespace, and removing one can wait in the kernel
        for that namespace's mounts to be detached: milliseconds the loop need not spend."""
        try:
            if self.creds is not None:
                self.creds.close_socket(sandbox_id)
        except Exception:
            log.error("cannot close the credential socket of %s", sandbox_id, exc_info=True)
        shutil.rmtree(self.settings.work_dir / sandbox_id, ignore_errors=True)

    def _heartbeat(self) -> None:
        assert self.api is not None  # noqa: S101
        self._next_heartbeat = time.monotonic() + self.settings.heartbeat_interval
        try:
            self.discovery_health.send_heartbeat(self.api, self._held())
        except (ServerUnavailable, ApiRefused) as exc:
            log.warning("heartbeat failed: %s", exc)

    def _held(self) -> dict[str, list[str]]:
        """Every item this supervisor holds: running in a sandbox, or ended with an outcome
        the server has not heard yet. The server takes back whatever else it thinks we run."""
        held: dict[str, list[str]] = {"tasks": [], "parse_jobs": [], "triggers": []}
        field = {"task": "tasks", "parse": "parse_jobs", "trigger": "triggers"}
        for item in self.active.values():
            if item.kind == "trigger":
                held["triggers"].extend(item.trigger_ids)
            else:
                held[field[item.kind]].append(item.item_id)
        for pending in self.outcomes.unreported if self.outcomes else ():
            if pending.body["kind"] in ("task", "parse"):
                held[field[pending.body["kind"]]].append(pending.body["id"])
        return held

    def _discover(self) -> None:
        assert self.api is not None and self.discovery is not None  # noqa: S101
        self._next_discovery = time.monotonic() + self.settings.discovery_interval
        try:
            changes = self.discovery.scan()
        except DiscoveryError as exc:
            # Nothing is reported, so nothing is deleted: a broken manifest must not read as
            # "every workflow is gone".
            self.discovery_health.failed(str(exc))
            return
        try:
            # Deletions first: a file renamed within one scan is the old one deleted and a
            # new one declaring the same workflow, which the server gives the new file only
            # once the old one is gone.
            if changes.deleted:
                report_deleted(self.api, [Path(p).as_uri() for p in changes.deleted])
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
            self.discovery.commit(changes)
            self.discovery_health.worked()
        except (ServerUnavailable, ApiRefused) as exc:
            log.warning("discovery could not reach the server (%s); will rescan", exc)

    def _apply_retention(self) -> None:
        self._next_retention = time.monotonic() + RETENTION_INTERVAL
        days = self.settings.log_retention_days
        if days > 0 and self.shipper is not None:  # never a log the server lacks some of
            self.bundles.prune(days * 86400, time.time())
            self.shipper.prune(self.settings.logs_dir, days * 86400, time.time())

    # --- callbacks from the credential server (other threads) ---------------------------------

    def _proxy(
        self, sandbox_id: str, method: str, path: str, body: Any, token: str
    ) -> tuple[int, Any]:
        """Forward one sandbox's API call, on the calling pool thread's kept connection, and
        note an accepted report of the item's end (see
        :data:`~privsep.runner.supervisor.outcomes.REPORT_CALLS`).
        :class:`~privsep.runner.api.keepalive.HttpUnavailable` is an OSError: the credential
        server turns it into ``server_unavailable`` for the child."""
        assert self._proxy_http is not None and self.outcomes is not None  # noqa: S101
        reply = self._proxy_http.request(method, path, body, token=token)
        if self.outcomes.note_proxied(sandbox_id, method, path, reply.status):
            self._claim_now()  # its downstream may be runnable now
        return reply.status, reply.data

    def _claim_now(self) -> None:
        """From another thread: claim at once, not at the next poll."""
        self._claim_soon = True
        self._waker.wake()

    def _on_violation(self, sandbox_id: str, reason: str) -> None:
        item = self.active.get(sandbox_id)
        log.warning("sandbox %s broke the credential protocol (%s): killing it", sandbox_id, reason)
        if item is not None:
            item.handle.kill(grace=0)

    # --- shutdown -------------------------------------------------------------------------------

    def shutdown(self) -> None:
        if self.wakeups is not None:
            self.wakeups.stop()
        for item in list(self.active.values()):
            item.handle.kill(grace=0)
        deadline = time.monotonic() + 10
        while self.active and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        if self.outcomes is not None:
            self.outcomes.last_try()
        if self.shipper is not None:
            self.shipper.stop()
        if self.watchdog:
            self.watchdog.stop()
        self._cleaner.shutdown(wait=True)
        # Before the backend: the credential sockets run on its reactor.
        if self.creds is not None:
            self.creds.stop()
        if self.backend is not None:
            self.backend.close()
        if self.api is not None:
            self.api.close()
        if self._proxy_http is not None:
            self._proxy_http.close()
        self._waker.close()
        metrics.stop(self._metrics)


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
    except InsecureFileError as exc:
        raise CommandError(str(exc)) from None
