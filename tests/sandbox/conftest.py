"""Fixtures for the sandbox backend tests: real backends, real children, no mocks.

One backend per launch mode for the whole session (a zygote takes a moment to warm up), and a
per-test bundle directory that the sandbox uid can read (pytest's ``tmp_path`` is 0700).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from privsep.sandbox import ProcessBackend, UidPool


@pytest.fixture(scope="session", params=["spawn", "template"])
def backend(request: pytest.FixtureRequest) -> Iterator[ProcessBackend]:
    """A real process backend in each launch mode, with its own uid range."""
    first = 200_000 if request.param == "spawn" else 201_000
    with ProcessBackend(launch_mode=request.param, uid_pool=UidPool(first, 64)) as b:
        yield b


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A world-readable directory for scripts the sandbox runs."""
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "bundle"
    path.mkdir(mode=0o755)
    return path
