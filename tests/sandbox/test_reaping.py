"""Who reaps a sandbox, and what the supervisor learns: exact status, rusage, parent death.

In template mode as root the zygote forks each sandbox as PID 1 of a new PID namespace and
reports its exit itself (no monitor process); elsewhere a monitor does. The claims are the same
in every mode and are checked here against real processes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sandbox_kit import script, spec_for

from privsep.sandbox import ExitReason, Limits, ProcessBackend, UidPool

BURN = """
    import time
    block = bytearray(64 << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    raise SystemExit(7)
"""


def test_exit_status_cpu_and_peak_rss_are_the_user_process(
    backend: ProcessBackend, bundle: Path
) -> None:
    handle = backend.launch(spec_for(bundle, script(bundle, "burn.py", BURN)))
    status = handle.wait(60)
    assert status is not None and status.reason is ExitReason.FAILED, handle.output().text
    assert (status.exit_code, status.signal) == (7, None)
    assert status.cpu_seconds is not None and 0.3 <= status.cpu_seconds < 30
    assert status.max_rss_kib is not None and status.max_rss_kib >= 64 << 10


def test_sigterm_reaches_the_user_process(backend: ProcessBackend, bundle: Path) -> None:
    path = script(bundle, "wait.py", "import time\nprint('up', flush=True)\ntime.sleep(60)")
    handle = backend.launch(spec_for(bundle, path))
    assert handle.wait_running(30)
    deadline = time.monotonic() + 30
    while "up" not in handle.output().text and time.monotonic() < deadline:
        time.sleep(0.01)
    handle.kill(grace=20)  # SIGTERM first; its handler makes the exit 128 + 15
    status = handle.wait(30)
    assert status is not None and status.reason is ExitReason.KILLED
    assert (status.exit_code, status.signal) == (143, None), handle.output().text


def test_sigkill_is_reported_as_the_signal(backend: ProcessBackend, bundle: Path) -> None:
    path = script(bundle, "hang.py", "import time\ntime.sleep(60)")
    handle = backend.launch(spec_for(bundle, path))
    assert handle.wait_running(30)
    handle.kill(grace=0)
    status = handle.wait(30)
    assert status is not None and status.reason is ExitReason.KILLED
    if backend.launch_mode == "template":  # the zygote reaped the user process itself
        assert (status.exit_code, status.signal) == (None, signal.SIGKILL)
    else:  # SIGKILL went to the monitor, which so never reported: outcome unknown
        assert (status.exit_code, status.signal) == (None, None)


@pytest.fixture
def doomed_backend() -> Iterator[ProcessBackend]:
    """A template backend of its own: the test kills its zygote."""
    with ProcessBackend(launch_mode="template", uid_pool=UidPool(204_000, 16), prewarm=1) as b:
        yield b


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sandboxes_die_with_the_zygote(doomed_backend: ProcessBackend, bundle: Path) -> None:
    backend = doomed_backend
    deadline = time.monotonic() + 30
    while not backend.warm_pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    (warm_pid,) = backend.warm_pids()
    cold = [  # launched while the pool is empty: forked from the top by the zygote
        backend.launch(spec_for(bundle, script(bundle, f"s{i}.py", "import time\ntime.sleep(60)")))
        for i in range(2)
    ]
    for handle in cold:
        assert handle.wait_running(30)
    zygote = backend.zygote_pid
    assert zygote is not None
    victims = [warm_pid, *(h.pid for h in cold if h.pid is not None)]
    sandbox_uids = {h.uid for h in cold}
    # The sandboxes are the zygote's own children, running as their pool uids.
    assert {p.pid for p in psutil.Process(zygote).children()} >= set(victims)
    os.kill(zygote, signal.SIGKILL)
    for handle in cold:
        status = handle.wait(30)
        assert status is not None and status.reason is ExitReason.LOST, status
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in victims) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(_gone(pid) for pid in victims)
    left = [
        p.pid
        for p in psutil.process_iter(["uids", "status"])
        if p.info["uids"] and p.info["uids"].real in sandbox_uids
        if p.info["status"] != psutil.STATUS_ZOMBIE
    ]
    assert left == []
    # The backend starts a new zygote and carries on.
    ok = backend.launch(spec_for(bundle, script(bundle, "after.py", "print('again')")))
    status = ok.wait(30)
    assert status is not None and status.ok, ok.output().text
    assert backend.zygote_pid not in (None, zygote)


def test_lifeline_reads_cut_only_when_its_writer_is_gone() -> None:
    from privsep.sandbox._enter import lifeline_cut

    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
        if pid == 0:  # another holder of the read end: its polls must not change ours
            os._exit(1 if lifeline_cut(r) else 0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert not lifeline_cut(r)
        os.close(w)
        w = -1
        assert lifeline_cut(r)
        assert lifeline_cut(r)  # and stays cut
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_wall_limit_still_kills_a_child_that_ignores_sigterm(
    backend: ProcessBackend, bundle: Path
) -> None:
    path = script(
        bundle,
        "deaf.py",
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)",
    )
    handle = backend.launch(
        spec_for(bundle, path, limits=Limits(wall_seconds=1, kill_grace_seconds=0.2))
    )
    status = handle.wait(30)
    assert status is not None and status.reason is ExitReason.TIMEOUT
    assert status.signal == (signal.SIGKILL if backend.launch_mode == "template" else None)
