"""The memory figure of the end-to-end benchmark: USS per running sleeping task, with
hundreds of sandboxes alive at once."""

from __future__ import annotations

import contextlib
import re
import signal
import statistics
import time
from dataclasses import dataclass
from typing import Any

import psutil

from benchmarks.e2e_system import UID_FIRST, Standalone, set_file_parallelism
from benchmarks.harness import progress

MiB = 1 << 20
SLEEP_MARK = "E2E-SLEEPING"


# --- instance B: USS per running sleeping task -------------------------------------------------


@dataclass
class Memory:
    marginal_mib: float  # (tree USS at M running - tree USS before) / M
    sandbox_mib: float  # user process (+ monitor, if any), mean over the running sandboxes
    user_mib: float  # the user process alone
    running: int
    ramp_s: float  # trigger → the last sleeper's user code running
    by_role_mib: dict[str, float]  # growth per task of the long-lived processes
    release_outcome: str  # what happened when all M were released at once


def uss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_full_info().uss)
    except psutil.Error:
        return 0


def _release_outcome(system: Standalone, run_id: str, run: Any, seconds: float) -> str:
    states: dict[str, int] = {}
    errors: dict[str, int] = {}
    for attempt in system.attempts(run_id):
        states[attempt.state.value] = states.get(attempt.state.value, 0) + 1
        if attempt.error:
            first = attempt.error.strip().splitlines()[-1][:80]
            errors[first] = errors.get(first, 0) + 1
    when = (
        f"run {run.state.value} {seconds:.0f} s later"
        if run
        else f"run not over in {seconds:.0f} s"
    )
    text = f"all released at once: {when}; attempts " + ", ".join(
        f"{n} {state}" for state, n in sorted(states.items())
    )
    if errors:
        common = max(errors, key=lambda e: errors[e])
        text += f"; most common error ({errors[common]} times): {common}"
    return text


def measure_memory(system: Standalone, count: int, step: int, settle_s: float) -> Memory:
    """``system`` starts with parallelism ``min(step, count)`` from its configuration file;
    each time that many sleepers run, the file says ``step`` more and the supervisor gets a
    SIGHUP, until ``count`` run."""
    time.sleep(settle_s)  # let the prewarmed templates settle
    roles = system.processes()
    before = {name: sum(uss(p) for p in procs) for name, procs in roles.items()}
    start = time.time()
    run_id = system.trigger("e2e_sleep")
    deadline = time.monotonic() + 120 + count
    sleeping: dict[str, float] = {}
    allowed = min(step, count)
    while True:
        progress(f"waiting for {allowed} of {count} sleeping tasks to run")
        while len(sleeping) < allowed:
            system.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(sleeping)} of {allowed} tasks running\n{system.output()}"
                )
            for attempt in system.attempts(run_id):
                if attempt.id not in sleeping:
                    log = system.attempt_log(attempt.id)
                    found = re.search(SLEEP_MARK + r" (\d+\.\d+)", log)
                    if found:
                        sleeping[attempt.id] = float(found[1])
            time.sleep(0.5)
        if allowed >= count:
            break
        allowed = min(allowed + step, count)
        set_file_parallelism(system.home, allowed)
        for proc in system.processes()["supervisor"]:
            proc.send_signal(signal.SIGHUP)
    ramp = max(sleeping.values()) - start
    time.sleep(min(1.0, settle_s))
    progress(f"all {count} running after {ramp:.1f} s; measuring USS of the process tree")
    roles = system.processes()
    after = {name: sum(uss(p) for p in procs) for name, procs in roles.items()}
    pool_uids = range(UID_FIRST, UID_FIRST + 1_000_000)
    users = []
    for proc in roles["sandboxes"]:
        with contextlib.suppress(psutil.Error):
            if proc.uids().real in pool_uids:
                users.append(proc)
    user_pids = {p.pid for p in users}
    sandbox_pids = {p.pid for p in roles["sandboxes"]}
    # Each sandbox's top user process; its parent is its monitor, or (template mode as root,
    # no monitor) the zygote itself, which is not part of the sandbox.
    tops = []
    monitors = {}
    for proc in users:
        with contextlib.suppress(psutil.Error):
            parent = proc.parent()
            if parent is not None and parent.pid not in user_pids:
                tops.append(proc)
                if parent.pid in sandbox_pids:
                    monitors[parent.pid] = parent
    user_uss = [uss(p) for p in users]
    monitor_uss = [uss(p) for p in monitors.values()]
    running = len(tops)
    # Definition files reach sandboxes as pinned copies, so a release file would not be seen;
    # a signal to each sleeping user process (a pool uid) is.
    for proc in users:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGUSR1)
    progress("released the sleepers (SIGUSR1); waiting for the run to end")
    released = time.monotonic()
    # Not a figure, but what happens when M tasks end at once is worth reporting.
    run = system.wait_run(run_id, timeout=120 + count, must_succeed=False)
    outcome = _release_outcome(system, run_id, run, time.monotonic() - released)
    progress(f"  {outcome}")
    growth = {
        name: (after[name] - before[name]) / count / MiB
        for name in ("standalone", "server", "supervisor", "zygote", "other")
    }
    return Memory(
        marginal_mib=(sum(after.values()) - sum(before.values())) / count / MiB,
        sandbox_mib=(sum(user_uss) + sum(monitor_uss)) / max(running, 1) / MiB,
        user_mib=statistics.mean(user_uss) / MiB if user_uss else 0.0,
        running=running,
        ramp_s=ramp,
        by_role_mib=growth,
        release_outcome=outcome,
    )
