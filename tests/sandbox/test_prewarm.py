"""Pre-warmed sandboxes: used when ready, replaced when dead, never a shortcut around setup."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_kit import script, spec_for

from privsep.sandbox import ExitReason, ProcessBackend, UidPool


@pytest.fixture(scope="module")
def warm_backend() -> Iterator[ProcessBackend]:
    with ProcessBackend(launch_mode="template", uid_pool=UidPool(203_000, 16), prewarm=1) as b:
        yield b


def wait_for_warm(backend: ProcessBackend) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = backend.warm_pids()
        if pids:
            return pids
        time.sleep(0.02)
    raise AssertionError("the pre-warmed pool never filled")


def test_launch_uses_the_prewarmed_sandbox(warm_backend: ProcessBackend, bundle: Path) -> None:
    (warm_pid,) = wait_for_warm(warm_backend)
    handle = warm_backend.launch(spec_for(bundle, script(bundle, "ok.py", "print('hi')")))
    assert handle.pid == warm_pid
    status = handle.wait(30)
    assert status is not None and status.ok, handle.output().text
    assert handle.output().text == "hi\n"


def test_a_dead_prewarmed_sandbox_is_discarded(warm_backend: ProcessBackend, bundle: Path) -> None:
    (warm_pid,) = wait_for_warm(warm_backend)
    os.kill(warm_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the zygote has reaped it
        try:
            os.kill(warm_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    handle = warm_backend.launch(spec_for(bundle, script(bundle, "ok2.py", "print('fresh')")))
    assert handle.pid != warm_pid
    status = handle.wait(30)
    assert status is not None and status.reason is ExitReason.SUCCEEDED, handle.output().text
    assert handle.output().text == "fresh\n"
