"""The shipped systemd units are valid for systemd itself, and point at real commands."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).parent.parent / "packaging" / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_unit_verifies(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of Debian's systemd package"
    runner = Path(sys.executable).parent / "runner"
    text = unit.read_text().replace("/opt/privsep/.venv/bin/runner", str(runner))
    copy = tmp_path / unit.name
    copy.write_text(text)
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if unit.name in line or "Unknown" in line
    ]
    assert not problems, problems
    assert "ExecStart=" in text and "runner" in text


def test_supervisor_unit_is_type_notify_with_a_watchdog() -> None:
    text = (
        Path(__file__).parent.parent / "packaging/systemd/privsep-supervisor.service"
    ).read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text and "ExecReload=" in text
