"""The one exit classification both backends use, and its order of precedence.

Scripted facts, no sandbox: each case gives facts that point at two or more reasons at once and
asserts which one wins. The facts come in the two shapes the backends produce (the process
backend measures CPU time and names its monitor; the container backend has Docker's exit code
and error instead), so the precedence is pinned for both. That each backend really goes through
``classify`` is covered by their real-sandbox tests (setup failure, timeout, exit codes).
"""

from __future__ import annotations

import signal
from dataclasses import replace

import pytest

from privsep.sandbox import ExitReason, Limits, SetupStep
from privsep.sandbox._classify import ExitFacts, classify

LIMITS = Limits(wall_seconds=30, memory_bytes=1 << 28, cpu_seconds=5)
PROCESS = ExitFacts(started=False, evidence="monitor exited with code 1", cpu_seconds=0.1)
CONTAINER = ExitFacts(started=False, evidence="status unknown", lost="Docker did not report")
SECCOMP = (int(SetupStep.SECCOMP), "EINVAL")


@pytest.fixture(params=[PROCESS, CONTAINER], ids=["process", "container"])
def base(request: pytest.FixtureRequest) -> ExitFacts:
    facts: ExitFacts = request.param
    return facts


def test_a_timeout_wins_over_a_reported_setup_failure_and_keeps_it(base: ExitFacts) -> None:
    facts = replace(
        base, termination=ExitReason.TIMEOUT, setup_failure=SECCOMP, oom_killed=True, signal=9
    )
    status = classify(facts, LIMITS)
    assert status.reason is ExitReason.TIMEOUT
    assert status.detail == (
        "wall-clock limit of 30 s reached; sandbox killed "
        "(the sandbox had reported: seccomp install failed: EINVAL)"
    )


def test_a_kill_on_request_wins_over_the_memory_limit(base: ExitFacts) -> None:
    facts = replace(base, started=True, termination=ExitReason.KILLED, oom_killed=True, signal=9)
    assert str(classify(facts, LIMITS)) == "killed: killed on request"


def test_the_memory_limit_wins_over_a_reported_setup_failure(base: ExitFacts) -> None:
    status = classify(replace(base, oom_killed=True, setup_failure=SECCOMP), LIMITS)
    assert status.reason is ExitReason.MEMORY_LIMIT
    assert "(the sandbox had reported: seccomp install failed: EINVAL)" in status.detail


def test_a_reported_setup_failure_wins_over_the_exit_status(base: ExitFacts) -> None:
    status = classify(replace(base, setup_failure=SECCOMP, exit_code=83), LIMITS)
    assert status.reason is ExitReason.SETUP_FAILED
    assert status.setup_step is SetupStep.SECCOMP
    assert str(status) == "setup-failed: seccomp install failed: EINVAL"
    assert (status.exit_code, status.signal, status.cpu_seconds) == (None, None, None)


def test_a_step_named_only_by_its_exit_code(base: ExitFacts) -> None:
    status = classify(replace(base, setup_failure=(int(SetupStep.RLIMITS), None)), LIMITS)
    assert (status.setup_step, status.detail) == (
        SetupStep.RLIMITS,
        "setting resource limits failed",
    )


def test_a_code_no_step_has_is_a_bootstrap_failure(base: ExitFacts) -> None:
    status = classify(replace(base, setup_failure=(3, "garbled")), LIMITS)
    assert (status.setup_step, status.detail) == (
        SetupStep.BOOTSTRAP,
        "sandbox bootstrap failed (bad launch request): garbled",
    )


def test_a_silent_death_in_setup_says_what_was_seen(base: ExitFacts) -> None:
    killed = classify(replace(base, signal=signal.SIGSEGV), LIMITS)
    assert killed.reason is ExitReason.SETUP_FAILED and killed.setup_step is SetupStep.BOOTSTRAP
    assert killed.detail == "sandbox died before user code started (killed by SIGSEGV)"
    unknown = classify(base, LIMITS)
    assert unknown.detail == f"sandbox died before user code started ({base.evidence})"


def test_setup_codes_are_ignored_once_user_code_started(base: ExitFacts) -> None:
    status = classify(replace(base, started=True, setup_failure=SECCOMP, exit_code=83), LIMITS)
    assert str(status) == "failed: exited with code 83"


def test_an_unreported_exit_is_lost(base: ExitFacts) -> None:
    status = classify(replace(base, started=True), LIMITS)
    assert status.reason is ExitReason.LOST
    assert status.detail == f"{base.lost} ({base.evidence})"


def test_the_cpu_limit_is_read_from_cpu_time_where_it_was_measured() -> None:
    spent = replace(PROCESS, started=True, signal=signal.SIGKILL, cpu_seconds=5.2)
    assert str(classify(spent, LIMITS)) == "cpu-limit: CPU limit of 5 s reached (SIGKILL)"
    # SIGXCPU sent by hand, well under the limit: not the limit's doing
    early = replace(PROCESS, started=True, signal=signal.SIGXCPU, cpu_seconds=0.5)
    assert classify(early, LIMITS).reason is ExitReason.SIGNALED


def test_the_cpu_limit_is_read_from_sigxcpu_where_cpu_time_is_unknown() -> None:
    xcpu = replace(CONTAINER, started=True, signal=signal.SIGXCPU)
    assert str(classify(xcpu, LIMITS)) == "cpu-limit: CPU limit of 5 s reached (SIGXCPU)"
    no_limit = Limits(wall_seconds=30)
    assert classify(xcpu, no_limit).reason is ExitReason.SIGNALED


def test_user_code_s_own_end(base: ExitFacts) -> None:
    started = replace(base, started=True)
    assert classify(replace(started, exit_code=0), LIMITS).ok
    assert str(classify(replace(started, exit_code=2), LIMITS)) == "failed: exited with code 2"
    killed = classify(replace(started, signal=signal.SIGKILL), LIMITS)
    assert str(killed) == "signaled: killed by SIGKILL (perhaps out of memory?)"
