"""``runner token-refresher``: the sidecar that holds the long-lived credential.

Airflow's ``airflow kerberos`` holds a keytab and keeps a short-lived ticket in a cache that the
workers read; the workers never see the keytab. This is the same pattern for privsep. In
privsep mode the refresher holds the supervisor's Ed25519 key, buys a supervisor session token
with it (the supervisor's own session code: :class:`~privsep.runner.api.session.SupervisorApi`)
and writes only that token to the shared file a supervisor with
``supervisor.session_token_file`` reads. In Kerberos mode it runs ``kinit`` for a keytab into
a shared ticket cache (:mod:`~privsep.runner.supervisor.kerberos`).

Renewal comes at about half the token's life, with jitter so that a fleet does not renew in
step; while the server is down the session is retried with the supervisor's backoff (1 s
doubling to 5 min, one log line per attempt, failing over across ``server.urls``). A
refusal (an unknown or revoked supervisor, a bad key) ends the refresher with one line: only
an operator can fix it. Under systemd (``Type=notify``) READY=1 follows the first write, and
SIGTERM ends any wait at once. Neither the key nor a token is ever logged.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from privsep.runner.api.credential import load_credential
from privsep.runner.api.session import ApiRefused, SupervisorApi
from privsep.runner.api.token_file import check_token_file, group_id, write_session_token
from privsep.runner.config.endpoints import endpoints
from privsep.runner.config.loader import Config, ConfigError
from privsep.runner.errors import CommandError
from privsep.runner.supervisor import systemd
from privsep.runner.supervisor.loopwake import LoopWaker, StopOnTerm

if TYPE_CHECKING:
    from privsep.runner.supervisor.systemd import Notifier

log = logging.getLogger("privsep.token_refresher")

# Renew when this share of the token's life has passed, give or take the jitter.
RENEW_AT = 0.5
RENEW_JITTER = 0.1
# Never renew more often than this, whatever the server's token lifetime.
RENEW_MIN = 1.0


@dataclass(frozen=True)
class RefresherSettings:
    """What ``runner token-refresher`` reads from the configuration, checked at once."""

    mode: str
    gid: int
    token_file: str = ""  # privsep mode
    credential: str = field(default="", repr=False)  # privsep mode: the key's path
    name: str = ""
    server_urls: tuple[str, ...] = ()
    audience: str = ""
    api_socket: str = ""
    principal: str = ""  # kerberos mode
    keytab: str = ""
    ccache: str = ""
    interval: float = 3600.0

    @classmethod
    def from_config(cls, cfg: Config) -> RefresherSettings:
        """Every setting the mode needs, or a :class:`ConfigError` naming the missing key."""
        import socket

        mode = str(cfg.get("token_refresher.mode"))
        try:
            gid = group_id(str(cfg.get("token_refresher.group")))
        except ValueError as exc:
            raise ConfigError(f"token_refresher.group: {exc}") from None
        if mode == "kerberos":
            for key in ("principal", "keytab", "ccache"):
                if not cfg.get(f"token_refresher.{key}"):
                    raise ConfigError(
                        f"token_refresher.mode is kerberos but token_refresher.{key} is empty"
                    )
            return cls(
                mode=mode,
                gid=gid,
                principal=str(cfg.get("token_refresher.principal")),
                keytab=str(cfg.path_of("token_refresher.keytab")),
                ccache=str(cfg.path_of("token_refresher.ccache")),
                interval=float(cfg.get("token_refresher.interval")),
            )
        where = endpoints(cfg)
        return cls(
            mode=mode,
            gid=gid,
            token_file=token_file_of(cfg),
            credential=str(cfg.path_of("supervisor.credential")),
            name=str(cfg.get("supervisor.name")) or socket.gethostname(),
            server_urls=where.urls,
            audience=where.audience,
            api_socket=str(cfg.get("supervisor.api_socket")),
        )


def token_file_of(cfg: Config) -> str:
    """The shared token file: ``token_refresher.token_file``, else the supervisor's
    ``supervisor.session_token_file`` (one configuration file can serve both processes)."""
    own = "token_refresher.token_file"
    shared = own if cfg.get(own) else "supervisor.session_token_file"
    if not cfg.get(shared):
        raise ConfigError(
            "token_refresher.token_file and supervisor.session_token_file are both empty: "
            "set one to the file the supervisor reads its session token from"
        )
    return str(cfg.path_of(shared))


def renew_delay(expires_at: float, now: float, rng: random.Random) -> float:
    """Seconds until the next renewal: about half of what is left of the token's life."""
    share = rng.uniform(RENEW_AT - RENEW_JITTER, RENEW_AT + RENEW_JITTER)
    return max(RENEW_MIN, (expires_at - now) * share)


def refresh_privsep(
    settings: RefresherSettings, stop: StopOnTerm, notifier: Notifier | None
) -> int:
    """Keep a fresh supervisor session token in ``settings.token_file`` until stopped."""
    from privsep.sandbox import set_non_dumpable

    key = load_credential(
        settings.credential,
        role="supervisor",
        missing_hint=f"create it with `runner credentials create --out {settings.credential}`",
    )
    set_non_dumpable()  # the key is in memory now: no core dump, no ptrace by our own uid
    try:
        api = SupervisorApi(
            settings.server_urls,
            settings.name,
            key,
            audience=settings.audience or None,
            unix_socket=settings.api_socket or None,
        )
    except ValueError as exc:
        raise CommandError(f"server.url or server.urls: {exc}") from None
    del key  # the client keeps the one reference it needs
    rng = random.Random()  # noqa: S311 - jitter, not cryptography
    ready = False
    try:
        while True:
            if notifier and not ready:
                notifier.status("opening a session with the server")
            try:
                if not api.open_session_with_backoff(stop):
                    return 0
            except ApiRefused as exc:
                raise CommandError(
                    f"the server refused a session to supervisor {settings.name!r}: {exc}"
                ) from None
            token = api.session_token()
            assert token is not None  # noqa: S101 - a session was just opened
            try:
                write_session_token(
                    settings.token_file, token, subject=api.supervisor_id, gid=settings.gid
                )
            except OSError as exc:
                raise CommandError(
                    f"cannot write the session token to {settings.token_file}: "
                    f"{exc.strerror or exc}"
                ) from None
            now = time.time()
            delay = renew_delay(token.expires_at, now, rng)
            log.info(
                "session token written to %s (expires in %.0f s); renewing in %.0f s",
                settings.token_file,
                token.expires_at - now,
                delay,
            )
            if notifier and not ready:
                notifier.ready(status=f"keeping {settings.token_file} fresh")
            ready = True
            if stop.wait(delay):
                return 0
    finally:
        api.close()


def run_token_refresher(cfg: Config) -> int:
    """The ``runner token-refresher`` command."""
    from privsep.runner.supervisor.kerberos import refresh_kerberos

    settings = RefresherSettings.from_config(cfg)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    waker = LoopWaker()
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: signals.put_nowait(signum))
    waker.wake_on_signals()
    notifier = systemd.Notifier.from_environ()
    systemd.scrub_environ(os.environ)  # kinit, our one child, has no business with them
    stop = StopOnTerm(waker, signals)
    try:
        if settings.mode == "kerberos":
            return refresh_kerberos(settings, stop, notifier)
        return refresh_privsep(settings, stop, notifier)
    finally:
        if notifier:
            notifier.stopping()
            notifier.close()
        waker.close()


def refresher_health(cfg: Config) -> tuple[bool, str]:
    """``runner health --token-refresher``: is the shared material still valid?

    Judged by what the supervisor depends on, not by the refresher's process: the token file
    holds a token that has not expired (privsep mode), or ``klist -s`` accepts the ticket
    cache (Kerberos mode). Either fails once the refresher has missed its renewals.
    """
    from privsep.runner.supervisor.kerberos import check_ccache

    if cfg.get("token_refresher.mode") == "kerberos":
        return check_ccache(RefresherSettings.from_config(cfg).ccache)
    # Only the file: the supervisor's host may not be able to resolve the key's path.
    result = check_token_file(token_file_of(cfg))
    return result.ok, result.reason
