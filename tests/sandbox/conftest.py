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


@pytest.fixture(scope="session", params=["spawn", "template", "template-cold"])
def backend(request: pytest.FixtureRequest) -> Iterator[ProcessBackend]:
    """A real process backend in each launch mode, with its own uid range.

    ``template`` hands most launches to pre-warmed sandboxes; ``template-cold`` has no
    pre-warmed pool, so every launch forks from the zygote and runs ``enter()`` from the top.
    """
    mode, _, cold = request.param.partition("-")
    first = {"spawn": 200_000, "template": 201_000, "template-cold": 202_000}[request.param]
    with ProcessBackend(
        launch_mode=mode,  # type: ignore[arg-type]
        uid_pool=UidPool(first, 64),
        prewarm=0 if cold else 4,
    ) as b:
        yield b


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A world-readable directory for scripts the sandbox runs."""
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "bundle"
    path.mkdir(mode=0o755)
    return path
