"""The seccomp filter: each denied call answers EPERM, foreign ABIs kill, ptrace/TIOCSTI fail."""

from __future__ import annotations

import os
import signal

from hostile_kit import Hostile

from privsep.sandbox import ExitReason
from privsep.sandbox.seccomp_policy import REQUIRED_DENY


def test_every_required_syscall_is_denied(hostile_any: Hostile) -> None:
    out = hostile_any.run("denied_syscalls")
    assert out.status.ok, out.log
    report = out.report
    assert set(REQUIRED_DENY) <= set(report)
    for name in REQUIRED_DENY:
        assert report[name] == "EPERM", (name, report[name])
    assert report["getpid"] == "ok:1"


def test_ptrace_of_supervisor_sibling_and_self(hostile: Hostile) -> None:
    sibling = hostile.start("sleep", "30")
    assert sibling.wait_running(30)
    out = hostile.run("ptrace", str(os.getpid()), str(sibling.pid))
    for key, value in out.report.items():
        assert value == "EPERM", (key, value)
    assert sibling.status is None  # untouched
    sibling.kill(grace=0)
    assert sibling.wait(30) is not None


def test_tiocsti_is_denied_whatever_the_high_bits(hostile: Hostile) -> None:
    out = hostile.run("tiocsti")
    for fd in (0, 1, 2):
        for request in ("TIOCSTI", "TIOCSTI_hi", "TIOCLINUX"):
            assert out.report[f"{request}:{fd}"] == "EPERM", (request, fd)
    assert out.report["dev_tty"] in ("ENXIO", "ENOENT")  # no controlling terminal at all


def test_x32_abi_syscall_kills_the_sandbox(hostile: Hostile) -> None:
    out = hostile.run("x32_syscall")
    assert out.report == {"before": True}  # never got past the call
    assert out.status.reason is ExitReason.SIGNALED
    assert out.status.signal == signal.SIGSYS
    assert str(out.status) == "signaled: killed by SIGSYS"
