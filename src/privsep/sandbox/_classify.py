"""One reading of how a sandbox ended, for every backend.

A backend gathers what it saw of a sandbox's end into :class:`ExitFacts` (the records its setup
code wrote, whether the supervisor ended it, what the kernel or Docker said); :func:`classify`
turns those facts into the :class:`ExitStatus` an operator reads. Both backends use this one
function, so the same end reads the same way whichever backend ran it.

When several facts are true at once, the first of these wins:

1. **The supervisor ended it** (``TIMEOUT``, then ``KILLED``). This is a decision the supervisor
   made and recorded before the sandbox's end was seen, so it is certain, and it is a cause: our
   SIGTERM and SIGKILL (to a monitor, to PID 1, to the cgroup) make a sandbox that is still in
   setup fail in ways it then reports, such as "the parent process died during setup". The
   reverse never happens: a failed setup step exits at once, long before a deadline, so it
   cannot make the supervisor time a sandbox out. Reporting the child's words instead would send
   the operator after a crash that our own kill caused, when the fix is a longer limit or a
   faster host. The child's report is not lost: it is appended to the detail.
2. **The kernel enforced the memory limit** (``MEMORY_LIMIT``). Also imposed from outside, and
   also a cause of setup failures (an allocation that fails while building the sandbox) rather
   than a consequence of one.
3. **The child reported a failed setup step** (``SETUP_FAILED`` naming the step), by a status
   record or by the step's exit code. Only believed while user code has not started, so user
   code exiting 79 on purpose is never read as a failed privilege drop.
4. **It died before user code started**, without saying why (``SETUP_FAILED``, bootstrap).
5. **Nobody reported its exit** (``LOST``): whoever reaps it died, or Docker did not answer.
6. **User code's own end**: a signal (``CPU_LIMIT`` when the CPU rlimit explains it, else
   ``SIGNALED``), else its exit code (``SUCCEEDED`` for 0, ``FAILED`` otherwise).

A ``SETUP_FAILED`` status carries no exit code, signal or CPU time: those describe user code,
which never ran; what the sandbox's own processes did goes into the detail.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from privsep.sandbox._steps import SETUP_CODES, SetupStep
from privsep.sandbox.spec import Limits
from privsep.sandbox.status import ExitReason, ExitStatus, signal_name


@dataclass(frozen=True)
class ExitFacts:
    """What a backend saw of one sandbox's end, before anything is concluded from it.

    ``setup_failure`` is the failed step's code and the child's words (``None`` when only the
    exit code named the step). ``exit_code``/``signal``: how the sandbox's user process (or,
    before user code, its root process) ended, when known. ``cpu_seconds`` is the user process
    tree's CPU time where the backend can measure it. ``evidence`` is the backend's own account
    of an end it saw no record of ("monitor killed by SIGKILL", Docker's error); ``lost`` the
    sentence for an exit nobody reported.
    """

    started: bool
    termination: ExitReason | None = None
    oom_killed: bool = False
    setup_failure: tuple[int, str | None] | None = None
    exit_code: int | None = None
    signal: int | None = None
    cpu_seconds: float | None = None
    max_rss_kib: int | None = None
    evidence: str = "status unknown"
    lost: str = "the sandbox's exit was not reported"


def classify(facts: ExitFacts, limits: Limits) -> ExitStatus:
    """The :class:`ExitStatus` for ``facts``, in the precedence the module docstring argues."""
    code, sig = facts.exit_code, facts.signal

    def ended(reason: ExitReason, detail: str) -> ExitStatus:
        return ExitStatus(
            reason,
            detail,
            exit_code=code,
            signal=sig,
            cpu_seconds=facts.cpu_seconds,
            max_rss_kib=facts.max_rss_kib,
        )

    reported = None
    if not facts.started and facts.setup_failure is not None:
        reported = failed_step(*facts.setup_failure)
    also = f" (the sandbox had reported: {reported[1]})" if reported is not None else ""
    if facts.termination is ExitReason.TIMEOUT:
        return ended(
            ExitReason.TIMEOUT,
            f"wall-clock limit of {limits.wall_seconds:g} s reached; sandbox killed{also}",
        )
    if facts.termination is ExitReason.KILLED:
        return ended(ExitReason.KILLED, f"killed on request{also}")
    if facts.oom_killed:
        return ended(
            ExitReason.MEMORY_LIMIT,
            f"memory limit of {limits.memory_bytes} bytes reached (OOM kill in the sandbox){also}",
        )
    if reported is not None:
        step, detail = reported
        return ExitStatus(ExitReason.SETUP_FAILED, detail, setup_step=step)
    if not facts.started:
        return ExitStatus(
            ExitReason.SETUP_FAILED,
            f"sandbox died before user code started ({_what_ended(facts)})",
            setup_step=SetupStep.BOOTSTRAP,
        )
    if code is None and sig is None:
        return ended(ExitReason.LOST, f"{facts.lost} ({facts.evidence})")
    if sig is not None:
        if _cpu_limit_explains(facts, limits, sig):
            return ended(
                ExitReason.CPU_LIMIT,
                f"CPU limit of {limits.cpu_seconds} s reached ({signal_name(sig)})",
            )
        hint = " (perhaps out of memory?)" if sig == signal.SIGKILL else ""
        return ended(ExitReason.SIGNALED, f"killed by {signal_name(sig)}{hint}")
    if code == 0:
        return ended(ExitReason.SUCCEEDED, "exited with code 0")
    return ended(ExitReason.FAILED, f"exited with code {code}")


def failed_step(code: int, detail: str | None) -> tuple[SetupStep, str]:
    """The step a setup failure's code names (bootstrap for a code no step has), and the line
    that says what failed: the step's message, then the child's words."""
    step = SetupStep(code) if code in SETUP_CODES else SetupStep.BOOTSTRAP
    return step, step.message if detail is None else f"{step.message}: {detail}"


def _what_ended(facts: ExitFacts) -> str:
    if facts.signal is not None:
        return f"killed by {signal_name(facts.signal)}"
    if facts.exit_code is not None:
        return f"exit {facts.exit_code}"
    return facts.evidence


def _cpu_limit_explains(facts: ExitFacts, limits: Limits, sig: int) -> bool:
    """Whether the CPU rlimit killed it: by the measured CPU time where the backend has it,
    else by the signal the rlimit sends first."""
    if limits.cpu_seconds is None:
        return False
    if facts.cpu_seconds is not None:
        return facts.cpu_seconds >= limits.cpu_seconds
    return sig == signal.SIGXCPU
