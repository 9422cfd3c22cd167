"""Suite-wide rules.

CI runs as root, so the tests that drop privileges, chown files and probe as the sandbox uid run
for real. A non-root run skips those few explicitly; in CI that would hide a missing capability,
so it is an error there instead. Under ``PRIVSEP_TESTS_STRICT=1`` (which ``scripts/test``, and
so CI, sets) every skip is a failure, whatever marker or call made it: CI has root, PostgreSQL,
Docker and systemd-analyze, so a test that skips there hides something it should have checked.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("CI") and os.geteuid() != 0:
        raise pytest.UsageError("CI runs the suite as root: privilege-dropping tests must run")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and os.environ.get("PRIVSEP_TESTS_STRICT") == "1"
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"PRIVSEP_TESTS_STRICT=1 and this test skipped: {reason}"
