"""The server-host commands: ``runner server`` and ``runner db``, and the database URL that
``runner supervisors|operators`` (:mod:`.principals`) and ``runner keys`` (:mod:`.keys`) use.
They turn configuration into plain values for :mod:`privsep.server`."""

from __future__ import annotations

import http.client
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privsep.runner.config.check_perms import PermissionViolation, enforce_at_start
from privsep.runner.config.loader import Config
from privsep.runner.errors import EXIT_FAILURE, CommandError
from privsep.secrets.files import InsecureFileError, make_private_dir

if TYPE_CHECKING:
    from privsep.server.public import ServerSettings, Stoppable


def database_url(cfg: Config) -> str:
    """``database.url``, or SQLite in the state directory when it is empty."""
    from privsep.server.public import sqlite_url_for

    url = str(cfg.get("database.url"))
    if url:
        return url
    state_dir = cfg.path_of("core.state_dir")
    make_private_dir(str(state_dir))
    return sqlite_url_for(state_dir / "privsep.db")


# ServerSettings fields read straight from one key each: (field, key, type). A path is read
# with ``path_of`` (relative to PRIVSEP_HOME), anything else with ``get``.
_SETTINGS: tuple[tuple[str, str, type], ...] = (
    ("signing_keyring", "server.signing_keyring", Path),
    ("bind", "server.bind", str),
    ("socket_path", "server.socket", Path),
    ("issuer", "server.issuer", str),
    ("max_request_bytes", "server.max_request_bytes", int),
    ("work_token_ttl", "server.work_token_ttl", int),
    ("work_token_max_lifetime", "server.work_token_max_lifetime", int),
    ("session_token_ttl", "server.session_token_ttl", int),
    ("signing_keys_refresh", "server.signing_keys_refresh", float),
    ("supervisor_heartbeat_timeout", "server.supervisor_heartbeat_timeout", int),
    ("operator_public_key", "server.operator_public_key", Path),
    ("operator_name", "server.operator_name", str),
    ("workers", "server.workers", int),
    ("scheduler_interval", "server.scheduler_interval", float),
    ("running_timeout_grace", "server.running_timeout_grace", float),
    ("max_running_per_workflow", "server.max_running_per_workflow", int),
    ("max_running_total", "server.max_running_total", int),
    ("wakeups_broker", "server.wakeups_broker", str),
    ("log_retention_days", "server.log_retention_days", float),
    ("log_retention_bytes", "server.log_retention_bytes", int),
    ("log_max_item_bytes", "server.log_max_item_bytes", int),
)


def _setting(cfg: Config, key: str, kind: type) -> Any:
    if kind is Path:
        return str(cfg.path_of(key))
    return kind(cfg.get(key))


def server_settings(cfg: Config) -> ServerSettings:
    from privsep.runner.config.endpoints import endpoints
    from privsep.server.public import ServerSettings

    fernet = str(cfg.get("server.fernet_key"))
    return ServerSettings(
        database_url=database_url(cfg),
        audience=endpoints(cfg).audience,
        fernet_keys=(fernet,) if fernet else (),
        **{field: _setting(cfg, key, kind) for field, key, kind in _SETTINGS},
    )


def run_server(cfg: Config) -> int:
    """Check permissions (strict by default), then serve until stopped."""
    from privsep.server.public import (
        AdminError,
        ListenError,
        check_signer,
        prepare_metrics,
        serve,
    )

    try:
        enforce_at_start(cfg, "server")
    except PermissionViolation as exc:
        print(
            f"{exc}\nrunner: refusing to start the server: fix the permissions above "
            "(runner check-perms shows them)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    settings = server_settings(cfg)
    try:
        check_signer(settings.database_url, settings.signing_keyring)
    except AdminError as exc:
        raise CommandError(f"refusing to start the server: {exc}") from None
    notify_when_serving(settings.bind)
    with prepare_metrics(settings):
        scheduler = start_scheduler(settings)
        try:
            return serve(settings)
        except ListenError as exc:
            raise CommandError(str(exc)) from None
        except InsecureFileError as exc:
            raise CommandError(f"refusing the signing key ring: {exc}") from None
        except KeyboardInterrupt:
            return 0
        finally:
            scheduler.stop(timeout=5)


def notify_when_serving(bind: str) -> None:
    """Under systemd (``Type=notify``), send READY=1 once the API answers ``/v1/health`` on
    ``bind``, so ``systemctl start`` returns only when the server serves and units ordered
    after it start against a live API.

    The sockets are bound before the workers start but listen only once a worker can serve,
    so until then the probe is refused and tries again. The notify variables are removed
    from the environment first: the workers must not inherit them.
    """
    from privsep.runner.supervisor import systemd

    notifier = systemd.Notifier.from_environ()
    systemd.scrub_environ(os.environ)
    if notifier is None:
        return
    address = local_address(bind)
    if address is None:
        return  # serve() refuses this bind in one line; there will be nothing to probe

    def probe() -> None:
        while not answers_health(*address):
            time.sleep(0.1)
        notifier.ready(status=f"serving on {bind}")

    threading.Thread(target=probe, name="sd-ready", daemon=True).start()


def local_address(bind: str) -> tuple[str, int] | None:
    """Where this host reaches a server bound to ``bind`` (``host:port``): a wildcard bind is
    reached on loopback. None for a bind with no port."""
    host, _, port = bind.rpartition(":")
    if not port.isdigit():
        return None
    host = host.strip("[]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    return host, int(port)


def answers_health(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether the API at ``host:port`` answers ``GET /v1/health`` with 200 (it can serve)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/v1/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        conn.close()


def start_scheduler(settings: ServerSettings) -> Stoppable:
    """One scheduler per ``runner server``, in the parent process, before any worker forks."""
    from privsep.server.public import start_scheduler as _start_scheduler

    return _start_scheduler(settings)


def run_scheduler(cfg: Config) -> int:
    """``runner scheduler``: the scheduler on its own, for deployments whose API servers run
    with it switched off. Same permission check as the server; stops on SIGTERM or Ctrl-C."""
    import signal

    try:
        enforce_at_start(cfg, "scheduler")
    except PermissionViolation as exc:
        print(
            f"{exc}\nrunner: refusing to start the scheduler: fix the permissions above",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    settings = server_settings(cfg)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = start_scheduler(settings)
    print(
        f"privsep scheduler running (every {settings.scheduler_interval:g} s at most)",
        file=sys.stderr,
        flush=True,
    )
    stop.wait()
    thread.stop(timeout=10)
    return 0


def db_upgrade(cfg: Config) -> int:
    from privsep.server.public import db_upgrade as _db_upgrade

    return _db_upgrade(database_url(cfg), sys.stdout, sys.stderr)


def db_check(cfg: Config) -> int:
    from privsep.server.public import db_check as _db_check

    return _db_check(database_url(cfg), sys.stdout, sys.stderr)
