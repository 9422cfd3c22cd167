"""A supervisor that is not root sandboxes through an unprivileged user namespace.

The test gives an unprivileged uid a private mount namespace in which the interpreter (under
the 0700 /root) is reachable, then runs a real supervisor as that uid. Its sandbox must come up
isolated (PID 1, no capabilities, NO_NEW_PRIVS, seccomp) without any privilege of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PROBE = HERE.parent / "security" / "attacks" / "probe.py"
NOBODY = 65534

# Inside a private mount namespace: /root becomes an empty 0755 tmpfs that holds only the real
# .pyenv (moved in from a temporary bind), so uid 65534 can run the interpreter. The host's own
# mount table is not touched.
REVEAL_PYENV = """
set -e
stash=$(mktemp -d)
mount --bind /root/.pyenv "$stash"
mount -t tmpfs -o mode=0755 privsep-test /root
mkdir /root/.pyenv
mount --move "$stash" /root/.pyenv
exec setpriv --reuid={uid} --regid={uid} --clear-groups "$@"
"""


@pytest.fixture
def workroot() -> Iterator[Path]:
    """A directory owned by the unprivileged uid, outside pytest's 0700 temp tree."""
    if os.geteuid() != 0:
        pytest.fail("this test sets up the unprivileged supervisor and must start as root")
    path = Path(tempfile.mkdtemp(prefix="privsep-userns-"))
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("mode", ["spawn", "template"])
def test_unprivileged_supervisor_uses_a_user_namespace(mode: str, workroot: Path) -> None:
    cmd = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        REVEAL_PYENV.format(uid=NOBODY),
        "sh",
        sys.executable,
        "-I",
        str(HERE / "userns_driver.py"),
        mode,
        str(workroot),
        str(PROBE),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={}, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "unavailable" not in result, result
    assert result["supervisor_uid"] == NOBODY and result["userns"] is True
    assert result["describe"].startswith(f"process backend ({mode}): user namespace")
    assert result["reason"] == "succeeded", (result["detail"], result["log"])
    report = json.loads(result["log"].split("RESULT ", 1)[1])
    assert report["uid"] == [NOBODY] * 3  # same uid as the supervisor, mapped 1:1
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(report[key], 16) == 0, (key, report[key])
    assert report["NoNewPrivs"] == "1"
    assert report["Seccomp"] == "2"
