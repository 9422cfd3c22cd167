"""The supervisor's settings: what it reads from the configuration, and what SIGHUP changes.

Apart from the loop because it changes for another reason (a new option), and because one
table, :data:`_FROM_CONFIG`, says both where each setting comes from and whether a reload may
change it under a running supervisor: the loop's SIGHUP handler and the constructor read the
same rows, so a new option cannot be loaded at start and forgotten at reload.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from privsep.runner.config.endpoints import endpoints, split_urls
from privsep.runner.config.loader import Config, ConfigError
from privsep.runner.sources.discovery import load_sources


class _Key(NamedTuple):
    key: str
    convert: Callable[[Any], Any]
    reloadable: bool = False


_FROM_CONFIG: dict[str, _Key] = {
    "api_socket": _Key("supervisor.api_socket", str),
    "heartbeat_interval": _Key("supervisor.heartbeat_interval", float, reloadable=True),
    "drain_grace": _Key("supervisor.drain_grace", float, reloadable=True),
    "log_retention_days": _Key("supervisor.log_retention_days", float, reloadable=True),
    "discovery": _Key("supervisor.discovery", bool),
    "discovery_interval": _Key("supervisor.discovery_interval", float, reloadable=True),
    "task_timeout": _Key("supervisor.task_timeout", float, reloadable=True),
    "parse_timeout": _Key("supervisor.parse_timeout", float, reloadable=True),
    "trigger_timeout": _Key("supervisor.trigger_timeout", float, reloadable=True),
    "bundle_version": _Key("supervisor.bundle_version", str, reloadable=True),
    "network": _Key("sandbox.network", str, reloadable=True),
    "launch_mode": _Key("sandbox.launch_mode", str),
    "uid_first": _Key("sandbox.uid_first", int),
    "uid_count": _Key("sandbox.uid_count", int),
    "prewarm": _Key("sandbox.prewarm", int),
    "backend": _Key("sandbox.backend", str),
    "image": _Key("sandbox.image", str),
    "metrics_bind": _Key("supervisor.metrics_bind", str),
    "poll_interval": _Key("supervisor.poll_interval", float, reloadable=True),
    "wakeups": _Key("supervisor.wakeups", str),
    "wakeups_broker": _Key("supervisor.wakeups_broker", str),
}
"""Settings read as they are, by field name. The others (name, paths, parallelism, discovery
sources, hidden paths, the server's URLs and audience) need more than a conversion and are
made in :meth:`from_config`."""

RELOADABLE: tuple[str, ...] = (
    "parallelism",
    "discovery_sources",
    *(name for name, key in _FROM_CONFIG.items() if key.reloadable),
)
"""What SIGHUP changes in a running supervisor; the rest needs a restart."""


@dataclass
class SupervisorSettings:
    name: str
    server_urls: tuple[str, ...]  # in the order to try them: server.urls, else server.url
    credential: str  # "" behind a token refresher: then session_token_file is set
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
    audience: str = ""  # the aud of our assertions ("" = the first URL): server.audience
    metrics_bind: str = ""  # the loopback host:port of the metrics listener ("" = none)
    queues: tuple[str, ...] = ("default",)  # the work queues whose tasks we claim
    poll_interval: float = 1.0  # the longest wait between claims that found nothing
    wakeups: str = "poll"  # poll, or celery: also claim when a wake-up arrives
    wakeups_broker: str = field(default="", repr=False)  # may carry a password
    session_token_file: str = ""  # runner token-refresher's shared file ("" = our own key)

    @property
    def server_url(self) -> str:
        """The first URL: what a sandbox with host network is told (it has no failover)."""
        return self.server_urls[0]

    @classmethod
    def from_config(cls, cfg: Config) -> SupervisorSettings:
        executor = str(cfg.get("supervisor.executor"))
        parallelism = int(cfg.get("supervisor.parallelism")) or (os.cpu_count() or 1)
        if executor == "sequential":
            parallelism = 1
        token_file = str(cfg.get("supervisor.session_token_file"))
        # Behind a token refresher the key is not ours: it is never resolved (a systemd:
        # credential would not even be there), and what sandboxes must not see is the token.
        own = (
            os.path.dirname(cfg.path_of("supervisor.session_token_file"))
            if token_file
            else cfg.path_of("supervisor.credential")
        )
        hidden = {
            str(cfg.home / "credentials"),
            str(cfg.home / "keys"),
            str(cfg.path_of("server.signing_keyring")),
            str(cfg.path_of("core.state_dir")),
            str(own),
            str(cfg.path_of("operator.credential")),
        }
        if cfg.file_exists:
            hidden.add(str(cfg.path))
        sources = str(cfg.get("supervisor.discovery_sources"))
        try:
            load_sources(sources)
        except ValueError as exc:
            raise ConfigError(f"supervisor.discovery_sources {exc}") from None
        where = endpoints(cfg)
        if cfg.get("supervisor.wakeups") == "celery" and not cfg.get("supervisor.wakeups_broker"):
            raise ConfigError(
                "supervisor.wakeups is celery but supervisor.wakeups_broker is empty "
                "(set it to the server's server.wakeups_broker, e.g. redis://HOST:6379/0)"
            )
        return cls(
            name=str(cfg.get("supervisor.name")) or socket.gethostname(),
            server_urls=where.urls,
            audience=where.audience,
            credential="" if token_file else str(cfg.path_of("supervisor.credential")),
            session_token_file=str(cfg.path_of("supervisor.session_token_file"))
            if token_file
            else "",
            state_dir=cfg.path_of("core.state_dir"),
            runtime_dir=cfg.path_of("core.runtime_dir"),
            workflows_dir=cfg.path_of("core.workflows_dir"),
            parallelism=parallelism,
            discovery_sources=sources,
            queues=split_urls(str(cfg.get("supervisor.queues"))) or ("default",),
            hidden_paths=tuple(sorted(hidden)),
            **{name: key.convert(cfg.get(key.key)) for name, key in _FROM_CONFIG.items()},
        )

    def reload_from(self, new: SupervisorSettings) -> None:
        """Take the :data:`RELOADABLE` settings of ``new``."""
        for name in RELOADABLE:
            setattr(self, name, getattr(new, name))

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


__all__ = ["RELOADABLE", "SupervisorSettings"]
