"""Run one attack from ``attacks/probe.py`` in a real sandbox and collect what it reported."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from privsep.sandbox import ExitStatus, Limits, ProcessBackend, ProcessHandle, SandboxSpec

# The supervisor's planted secret (see conftest): in this process's memory for the whole run.
SECRET = b"PRIVSEP-PLANTED-SECRET-" + secrets.token_hex(16).encode()
SECRET_SHA256 = hashlib.sha256(SECRET).hexdigest()
_KEEP_IN_MEMORY = [SECRET * 4]

ATTACKS = Path(__file__).resolve().parent / "attacks"
PROBE = ATTACKS / "probe.py"
RUN_PATH = "privsep.sandbox.entrypoints:run_path"

# Small limits keep the whole suite fast while every bomb still hits a wall.
HOSTILE_LIMITS = Limits(
    wall_seconds=20,
    kill_grace_seconds=0.5,
    memory_bytes=256 << 20,
    pids=32,
    nofile=64,
    fsize_bytes=8 << 20,
    tmp_bytes=4 << 20,
    log_max_bytes=64 << 10,
    log_max_lines=2000,
    log_max_line_bytes=4096,
)


@dataclass
class Outcome:
    """What an attack left behind: the exit status, its report, the whole log."""

    handle: ProcessHandle
    status: ExitStatus
    report: dict[str, Any]
    log: str


def result_of(log: str) -> dict[str, Any]:
    """Merge every ``RESULT {...}`` line of a log."""
    out: dict[str, Any] = {}
    for line in log.splitlines():
        if line.startswith("RESULT "):
            out.update(json.loads(line[len("RESULT ") :]))
    return out


class Hostile:
    """Launches probes through one backend; every spec gets its own work dir."""

    def __init__(self, backend: ProcessBackend, root: Path) -> None:
        self.backend = backend
        self.root = root
        self._n = 0

    def spec(self, attack: str, *args: str, **kw: Any) -> SandboxSpec:
        """The spec for one probe run (``kw`` overrides SandboxSpec fields)."""
        self._n += 1
        defaults: dict[str, Any] = {
            "kind": "task",
            "entry_point": RUN_PATH,
            "argv": (str(PROBE), attack, *args),
            "workdir": str(self.root / f"work-{attack}-{self._n}"),
            "bundle_paths": (str(ATTACKS),),
            "limits": HOSTILE_LIMITS,
        }
        return SandboxSpec(**{**defaults, **kw})

    def start(self, attack: str, *args: str, **kw: Any) -> ProcessHandle:
        """Launch without waiting."""
        return self.backend.launch(self.spec(attack, *args, **kw))

    def run(self, attack: str, *args: str, timeout: float = 60, **kw: Any) -> Outcome:
        """Launch, wait, and collect."""
        handle = self.start(attack, *args, **kw)
        return self.collect(handle, timeout)

    @staticmethod
    def collect(handle: ProcessHandle, timeout: float = 60) -> Outcome:
        """Wait for a started probe and collect its outcome."""
        status = handle.wait(timeout)
        if status is None:
            handle.kill(grace=0)
            raise AssertionError(f"sandbox {handle.sandbox_id} did not finish in {timeout} s")
        log = handle.output().text
        return Outcome(handle, status, result_of(log), log)


def with_limits(**changes: Any) -> Limits:
    """HOSTILE_LIMITS with a few fields changed."""
    return replace(HOSTILE_LIMITS, **changes)
