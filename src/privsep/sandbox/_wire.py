"""What crosses from the supervisor into a sandboxed child, and what comes back.

Into the child goes one :class:`Plan`: everything ``enter()`` needs, already resolved by the
trusted parent (uid, cgroup files, the compiled seccomp program). It is encoded with ``marshal``
(builtin, no import cost); the bytes come only from the supervisor, never from user code.

Back from the child come *status records* on a dedicated pipe that user code never holds:

* ``F`` setup failed: the step's exit code and the error text (what, on what, OS reason);
* ``R`` ready: setup finished, user code is about to run (the write end is then closed);
* ``X`` exit: written outside the PID namespace by whoever reaped the user process (the zygote
  in template mode as root, the monitor otherwise) with its raw wait status, CPU time and peak
  RSS, so the supervisor learns the exact outcome even when it is not the parent.

Each record is one type byte, a 4-byte big-endian length and a marshal payload, at most
:data:`MAX_RECORD` bytes; the parser drops anything else.
"""

from __future__ import annotations

import marshal
import os
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import resource

MAX_RECORD = 8192
_HEADER = struct.Struct(">cI")

READY = b"R"
FAILED = b"F"
EXITED = b"X"


class Plan:
    """One child's resolved launch plan. Built by the supervisor, read by ``enter()``."""

    __slots__ = (
        "argv",
        "cgroup_procs",
        "entry",
        "env",
        "gid",
        "hidden_paths",
        "hostname",
        "kind",
        "limits",
        "network",
        "parent_pid",
        "payload",
        "ro_paths",
        "sandbox_id",
        "seccomp",
        "socket",
        "system_paths",
        "uid",
        "unsafe_inline",
        "userns",
        "workdir",
    )

    def __init__(
        self,
        *,
        sandbox_id: str,
        kind: str,
        entry: str,
        argv: list[str],
        payload: bytes,
        workdir: str,
        env: dict[str, str],
        limits: dict[str, int],
        network: str,
        ro_paths: list[str],
        hidden_paths: list[str],
        system_paths: list[str],
        socket: str | None,
        uid: int,
        gid: int,
        cgroup_procs: list[str],
        seccomp: bytes,
        parent_pid: int,
        hostname: str,
        userns: bool,
        unsafe_inline: bool,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.kind = kind
        self.entry = entry
        self.argv = argv
        self.payload = payload
        self.workdir = workdir
        self.env = env
        self.limits = limits
        self.network = network
        self.ro_paths = ro_paths
        self.hidden_paths = hidden_paths
        self.system_paths = system_paths
        self.socket = socket
        self.uid = uid
        self.gid = gid
        self.cgroup_procs = cgroup_procs
        self.seccomp = seccomp
        self.parent_pid = parent_pid
        self.hostname = hostname
        self.userns = userns
        self.unsafe_inline = unsafe_inline

    def to_wire(self) -> bytes:
        """Encode for the child: a marshal'd dict of builtins."""
        return marshal.dumps({name: getattr(self, name) for name in self.__slots__})

    @classmethod
    def from_wire(cls, data: bytes) -> Plan:
        """Decode what :meth:`to_wire` produced; raises ``ValueError`` on anything else."""
        try:
            raw = marshal.loads(data)  # noqa: S302 - written by the trusted supervisor
        except (EOFError, TypeError, ValueError) as exc:
            raise ValueError(f"undecodable launch plan: {exc}") from None
        if not isinstance(raw, dict) or set(raw) != set(cls.__slots__):
            raise ValueError("launch plan has the wrong fields")
        return cls(**raw)


def encode_record(kind: bytes, payload: Any = None) -> bytes:
    """One framed status record."""
    body = marshal.dumps(payload)
    if len(body) > MAX_RECORD:
        body = marshal.dumps(None)
    return _HEADER.pack(kind, len(body)) + body


def write_record(fd: int, kind: bytes, payload: Any = None) -> None:
    """Write one record; records are small, so a single write on a pipe is atomic."""
    data = encode_record(kind, payload)
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_exit_record(fd: int, status: int | None, usage: resource.struct_rusage | None) -> None:
    """The ``X`` record for a reaped user process (``status`` None: it could not be reaped)."""
    times = (0.0, 0.0, 0) if usage is None else (usage.ru_utime, usage.ru_stime, usage.ru_maxrss)
    write_record(fd, EXITED, (status, *times))


class RecordParser:
    """Incremental parser for the status pipe, fed by the supervisor's reactor."""

    def __init__(self) -> None:
        self._buf = b""
        self.broken = False

    def feed(self, data: bytes) -> list[tuple[bytes, Any]]:
        """Return the complete records in ``data`` (plus what was buffered before)."""
        if self.broken:
            return []
        self._buf += data
        out: list[tuple[bytes, Any]] = []
        while len(self._buf) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._buf)
            if length > MAX_RECORD or kind not in (READY, FAILED, EXITED):
                self.broken = True
                self._buf = b""
                break
            if len(self._buf) < _HEADER.size + length:
                break
            body = self._buf[_HEADER.size : _HEADER.size + length]
            self._buf = self._buf[_HEADER.size + length :]
            try:
                payload = marshal.loads(body)  # noqa: S302 - our own framing, bounded
            except (EOFError, TypeError, ValueError):
                self.broken = True
                break
            out.append((kind, payload))
        return out


# Variables that must never reach user code even if a caller puts them in the allow-list: they
# would let a child talk to systemd as the supervisor (notify, watchdog, socket activation) or
# find the supervisor's credentials and configuration.
FORBIDDEN_ENV_NAMES = frozenset({"NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY"})
FORBIDDEN_ENV_PREFIXES = ("WATCHDOG_", "LISTEN_", "PRIVSEP__")
CREDENTIAL_SOCKET_ENV = "PRIVSEP_CREDENTIAL_SOCKET"


def forbidden_env(name: str) -> bool:
    """Whether ``name`` may never be passed into a sandbox."""
    return name in FORBIDDEN_ENV_NAMES or name.startswith(FORBIDDEN_ENV_PREFIXES)
