"""Suite-wide rules.

CI runs as root, so the tests that drop privileges, chown files and probe as the sandbox uid run
for real. A non-root run skips those few explicitly; in CI that would hide a missing capability,
so it is an error there instead.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("CI") and os.geteuid() != 0:
        raise pytest.UsageError("CI runs the suite as root: privilege-dropping tests must run")
