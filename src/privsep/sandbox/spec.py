"""``SandboxSpec``: everything one isolated child needs, and nothing of the supervisor's.

A spec is backend-neutral: the process backend turns it into namespaces, a pool uid, rlimits and
seccomp; a container backend would turn the same spec into Docker options. It is validated when
built, so a bad spec fails in the caller with a message, not later in a child.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from privsep.sandbox._wire import forbidden_env

Kind = Literal["parse", "trigger", "task"]
Network = Literal["none", "host"]

KINDS: tuple[str, ...] = ("parse", "trigger", "task")
NETWORKS: tuple[str, ...] = ("none", "host")

MiB = 1 << 20
_ENTRY_RE = re.compile(r"^privsep(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Resource limits of one sandbox. ``None`` means "not limited" (never for core: always 0).

    ``memory_bytes`` caps each process's data segment (``RLIMIT_DATA``) and, where cgroups are
    writable, the whole sandbox. ``pids`` caps processes and threads (``RLIMIT_NPROC`` on the
    sandbox's own uid, and the cgroup's ``pids.max``). ``tmp_bytes`` sizes the private ``/tmp``
    and ``/dev/shm``. The log limits bound what the supervisor keeps of the child's output.
    ``cpus`` caps the share of CPU time in cores (``1.5`` = one and a half cores); only the
    container backend applies it (Docker's ``nano_cpus``), the process backend has ``cpu_seconds``.
    """

    wall_seconds: float = 3600.0
    kill_grace_seconds: float = 5.0
    cpu_seconds: int | None = None
    memory_bytes: int | None = 1024 * MiB
    pids: int | None = 256
    nofile: int = 1024
    fsize_bytes: int | None = 1024 * MiB
    tmp_bytes: int = 64 * MiB
    log_max_bytes: int = 10 * MiB
    log_max_lines: int = 100_000
    log_max_line_bytes: int = 16 * 1024
    cpus: float | None = None

    def __post_init__(self) -> None:
        if self.cpus is not None and not 0.01 <= self.cpus <= 1024:
            raise ValueError(f"limits.cpus must be between 0.01 and 1024 cores, not {self.cpus}")
        if not self.wall_seconds > 0:
            raise ValueError(f"limits.wall_seconds must be positive, not {self.wall_seconds}")
        if self.kill_grace_seconds < 0:
            raise ValueError("limits.kill_grace_seconds must not be negative")
        for name in ("cpu_seconds", "memory_bytes", "pids", "fsize_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"limits.{name} must be at least 1 (or None), not {value}")
        for name in ("nofile", "tmp_bytes", "log_max_bytes", "log_max_lines"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name} must be at least 1")
        if self.log_max_line_bytes < 80:
            raise ValueError("limits.log_max_line_bytes must be at least 80")

    def to_wire(self) -> dict[str, int]:
        """The rlimit-ish part, as the child's plan carries it."""
        out = {"tmp_bytes": self.tmp_bytes, "nofile": self.nofile}
        for name in ("cpu_seconds", "memory_bytes", "pids", "fsize_bytes"):
            value = getattr(self, name)
            if value is not None:
                out[name] = int(value)
        return out


def _abs_path(what: str, path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ValueError(f"{what} must be an absolute path, not {path!r}")
    norm = os.path.normpath(path)
    if norm == "/":
        raise ValueError(f"{what} may not be '/'")
    if norm != path.rstrip("/"):
        raise ValueError(f"{what} must be normalized (no '..', '//' or '.'): {path!r}")
    return norm


@dataclass(frozen=True, kw_only=True)
class SandboxSpec:
    """One child: what runs, where, with which limits, and what it may see.

    * ``kind``: ``parse``, ``trigger`` or ``task`` (``parse`` never gets the network);
    * ``network``: ``none`` is a fresh network namespace with only loopback; ``host`` shares
      the host's, including its *abstract* unix sockets, so the supervisor must not listen
      on any;
    * ``entry_point``: ``"privsep.module:function"``, called as ``function(argv, payload)``
      inside the sandbox; it is trusted code that then loads user code;
    * ``workdir``: created (if missing) mode 0700 and owned by the sandbox uid, read-write;
    * ``env``: the exact environment (names like ``NOTIFY_SOCKET``, ``WATCHDOG_*``,
      ``LISTEN_*``, ``CREDENTIALS_DIRECTORY`` and ``PRIVSEP__*`` are refused);
    * ``code_paths`` / ``bundle_paths``: mounted read-only at the same path;
    * ``hidden_paths``: state, config and credential directories or files that must not be
      visible even if they sit inside a bound tree;
    * ``credential_socket``: a unix socket path, bind-mounted at the same path and announced in
      ``PRIVSEP_CREDENTIAL_SOCKET``;
    * ``log_path``: where the captured output goes (default: a file in the backend's log dir).
    """

    kind: Kind
    entry_point: str
    workdir: str
    argv: tuple[str, ...] = ()
    payload: bytes = b""
    env: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    network: Network = "none"
    code_paths: tuple[str, ...] = ()
    bundle_paths: tuple[str, ...] = ()
    hidden_paths: tuple[str, ...] = ()
    credential_socket: str | None = None
    log_path: str | None = None
    sandbox_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.network not in NETWORKS:
            raise ValueError(f"network must be none or host, not {self.network!r}")
        if self.kind == "parse" and self.network != "none":
            raise ValueError("a parse sandbox never gets the network (network must be none)")
        if not _ENTRY_RE.match(self.entry_point):
            raise ValueError(
                f"entry_point must be 'privsep.module:function', not {self.entry_point!r}"
            )
        if not _ID_RE.match(self.sandbox_id):
            raise ValueError(f"sandbox_id {self.sandbox_id!r} is not a safe identifier")
        if not isinstance(self.payload, bytes):
            raise ValueError("payload must be bytes")
        set_ = object.__setattr__
        set_(self, "workdir", _abs_path("workdir", self.workdir))
        set_(self, "argv", tuple(str(a) for a in self.argv))
        for name in ("code_paths", "bundle_paths", "hidden_paths"):
            paths = tuple(_abs_path(name, p) for p in getattr(self, name))
            set_(self, name, paths)
        if self.credential_socket is not None:
            set_(self, "credential_socket", _abs_path("credential_socket", self.credential_socket))
        if self.log_path is not None:
            set_(self, "log_path", _abs_path("log_path", self.log_path))
        env = dict(self.env)
        for name, value in env.items():
            if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
                raise ValueError(f"environment variable name {name!r} is not valid")
            if not isinstance(value, str) or "\0" in value:
                raise ValueError(f"environment variable {name} must be a string without NUL")
            if forbidden_env(name):
                raise ValueError(f"environment variable {name} may never be passed to a sandbox")
        set_(self, "env", MappingProxyType(env))
