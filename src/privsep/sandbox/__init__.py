"""Sandbox backends: one spec in, one isolated child out. Knows nothing of secrets.

Public API::

    from privsep.sandbox import Limits, ProcessBackend, SandboxSpec

    with ProcessBackend(launch_mode="template") as backend:
        handle = backend.launch(SandboxSpec(kind="task", entry_point="privsep.x:main", ...))
        status = handle.wait()          # ExitStatus: reason, detail, exit code or signal
        print(handle.output().text)     # captured, escaped, capped

Names are loaded lazily: the sandboxed child imports ``privsep.sandbox._child`` and must not pay
for (or hold) the supervisor-side machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from privsep.sandbox._steps import SetupStep
    from privsep.sandbox.container import ContainerBackend, ContainerHandle
    from privsep.sandbox.handle import SandboxHandle
    from privsep.sandbox.privdrop import PrivilegeDropError, drop_privileges
    from privsep.sandbox.process import (
        ProcessBackend,
        ProcessHandle,
        SandboxError,
        SandboxLaunchError,
        SandboxUnavailable,
        set_non_dumpable,
        userns_available,
    )
    from privsep.sandbox.seccomp_policy import SeccompUnavailable
    from privsep.sandbox.spec import Kind, Limits, Network, SandboxSpec
    from privsep.sandbox.status import ExitReason, ExitStatus, SandboxOutput
    from privsep.sandbox.uidpool import UidPool, UidPoolExhausted
    from privsep.sandbox.view import Unreadable, unreadable_by_sandbox

_EXPORTS = {
    "SetupStep": "privsep.sandbox._steps",
    "SandboxHandle": "privsep.sandbox.handle",
    "ContainerBackend": "privsep.sandbox.container",
    "ContainerHandle": "privsep.sandbox.container",
    "PrivilegeDropError": "privsep.sandbox.privdrop",
    "drop_privileges": "privsep.sandbox.privdrop",
    "ProcessBackend": "privsep.sandbox.process",
    "ProcessHandle": "privsep.sandbox.process",
    "SandboxError": "privsep.sandbox.process",
    "SandboxLaunchError": "privsep.sandbox.process",
    "SandboxUnavailable": "privsep.sandbox.process",
    "set_non_dumpable": "privsep.sandbox.process",
    "userns_available": "privsep.sandbox.process",
    "SeccompUnavailable": "privsep.sandbox.seccomp_policy",
    "Kind": "privsep.sandbox.spec",
    "Limits": "privsep.sandbox.spec",
    "Network": "privsep.sandbox.spec",
    "SandboxSpec": "privsep.sandbox.spec",
    "ExitReason": "privsep.sandbox.status",
    "ExitStatus": "privsep.sandbox.status",
    "SandboxOutput": "privsep.sandbox.status",
    "UidPool": "privsep.sandbox.uidpool",
    "UidPoolExhausted": "privsep.sandbox.uidpool",
    "Unreadable": "privsep.sandbox.view",
    "unreadable_by_sandbox": "privsep.sandbox.view",
}

__all__ = [
    "ContainerBackend",
    "ContainerHandle",
    "ExitReason",
    "ExitStatus",
    "Kind",
    "Limits",
    "Network",
    "PrivilegeDropError",
    "ProcessBackend",
    "ProcessHandle",
    "SandboxError",
    "SandboxHandle",
    "SandboxLaunchError",
    "SandboxOutput",
    "SandboxSpec",
    "SandboxUnavailable",
    "SeccompUnavailable",
    "SetupStep",
    "UidPool",
    "UidPoolExhausted",
    "Unreadable",
    "drop_privileges",
    "set_non_dumpable",
    "unreadable_by_sandbox",
    "userns_available",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'privsep.sandbox' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
