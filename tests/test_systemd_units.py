"""The systemd units under ``packaging/systemd``, checked by systemd's own tools.

``systemd-analyze security --offline=yes`` scores how much of the host each unit can reach;
the limits below are what each component allows (the supervisor must stay root with enough
capabilities to build sandboxes, so it cannot score like the server). ``systemd-analyze
verify``, ``systemd-sysusers`` and ``systemd-tmpfiles`` catch a unit or a file that systemd
would refuse, without running systemd.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "packaging" / "systemd"
SERVER = UNITS / "privsep-server.service"
SUPERVISOR = UNITS / "privsep-supervisor.service"
REFRESHER = UNITS / "privsep-token-refresher.service"
TARGET = UNITS / "privsep.target"
RUNNER = "/opt/privsep/venv/bin/runner"

# The most exposure each unit may show. The server needs nothing but a user, its directories
# and the network. The supervisor is root with CAP_SYS_ADMIN, the namespaces, mounts and
# cgroups a sandbox is built from, and the network its API calls need; what it scores beyond
# the server is exactly that (docs/deployment.md lists each remaining point, and
# test_every_supervisor_exposure_is_documented holds the list to the tool's).
# The token refresher needs no more than the server: a user, a runtime directory, the network.
MAX_EXPOSURE = {SERVER.name: 1.5, SUPERVISOR.name: 3.8, REFRESHER.name: 1.5}
DEPLOYMENT = ROOT / "docs" / "deployment.md"

ANALYZE = shutil.which("systemd-analyze")
# Under PRIVSEP_TESTS_STRICT (scripts/test, which installs systemd) a missing tool fails.
_STRICT = os.environ.get("PRIVSEP_TESTS_STRICT") == "1"
needs_analyze = pytest.mark.skipif(
    ANALYZE is None and not _STRICT,
    reason="systemd-analyze is not installed (scripts/test installs systemd)",
)


def _directives(unit: Path, name: str) -> list[str]:
    return [
        line.split("=", 1)[1].strip()
        for line in unit.read_text().splitlines()
        if line.startswith(f"{name}=")
    ]


def _exposure(unit: Path) -> float:
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert m, f"no score in systemd-analyze output:\n{done.stdout}\n{done.stderr}"
    return float(m.group(1))


@needs_analyze
@pytest.mark.parametrize("unit", [SERVER, SUPERVISOR, REFRESHER], ids=lambda u: u.name)
def test_security_exposure_within_limit(unit: Path) -> None:
    score = _exposure(unit)
    assert score <= MAX_EXPOSURE[unit.name], f"{unit.name} scores {score}"


def _exposed_items(unit: Path) -> list[str]:
    """The names of the items ``systemd-analyze security`` counts against ``unit``."""
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", "--json=short", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [item["name"] for item in json.loads(done.stdout) if item["exposure"]]


@needs_analyze
def test_every_supervisor_exposure_is_documented() -> None:
    """Each item still counted against the supervisor has its reason in the hardening notes:
    an exposure added to the unit without one fails here."""
    text = DEPLOYMENT.read_text()
    notes = text[text.index("## Hardening: what the units take away") :].replace("\\|", "|")
    exposed = _exposed_items(SUPERVISOR)
    assert exposed
    missing = [name for name in exposed if f"`{name}`" not in notes]
    assert not missing, f"not explained in {DEPLOYMENT.name}: {missing}"


@needs_analyze
def test_units_verify(tmp_path: Path) -> None:
    """``verify`` insists that ExecStart's program exists: point it at this venv's."""
    runner = Path(sys.executable).parent / "runner"
    copies = []
    for unit in (SERVER, SUPERVISOR, REFRESHER, TARGET):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(RUNNER, str(runner)))
        copies.append(str(copy))
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "verify", "--man=no", *copies],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_units_run_the_installed_runner() -> None:
    for unit in (SERVER, SUPERVISOR, REFRESHER):
        assert _directives(unit, "ExecStart")[0].split()[0] == RUNNER


def test_supervisor_unit_is_type_notify_with_a_watchdog() -> None:
    assert _directives(SUPERVISOR, "Type") == ["notify"]
    assert _directives(SUPERVISOR, "WatchdogSec") and _directives(SUPERVISOR, "ExecReload")


def test_documentation_points_at_installed_docs() -> None:
    """``Documentation=`` names files that docs/deployment.md installs from docs/."""
    for unit in (SERVER, SUPERVISOR, REFRESHER, TARGET):
        urls = " ".join(_directives(unit, "Documentation")).split()
        assert urls, unit.name
        for url in urls:
            prefix = "file:///usr/share/doc/privsep/"
            assert url.startswith(prefix), url
            assert (ROOT / "docs" / url[len(prefix) :]).is_file(), url


def test_every_supervisor_capability_says_why() -> None:
    """Each capability kept has a comment line of its own naming what needs it."""
    text = SUPERVISOR.read_text()
    (bounding,) = _directives(SUPERVISOR, "CapabilityBoundingSet")
    caps = bounding.split()
    assert "CAP_SYS_ADMIN" in caps and "CAP_SETUID" in caps
    for cap in caps:
        assert re.search(rf"^#\s+(CAP_\w+ )*{cap}\b.*\S", text, re.M), f"{cap} has no reason"
    assert _directives(SUPERVISOR, "AmbientCapabilities") == [""]


def test_supervisor_allows_the_namespaces_a_sandbox_makes() -> None:
    (allowed,) = _directives(SUPERVISOR, "RestrictNamespaces")
    assert set(allowed.split()) == {"mnt", "pid", "ipc", "uts", "cgroup", "net"}
    assert _directives(SUPERVISOR, "LoadCredential") == [
        "supervisor.key:/etc/privsep/supervisor.key"
    ]
    # sethostname runs in every sandbox's UTS namespace; ProtectHostname would filter it.
    assert _directives(SUPERVISOR, "ProtectHostname") == []


def test_supervisor_allows_only_the_mount_calls_a_sandbox_makes() -> None:
    """The four calls a sandbox's root is built with, never the rest of ``@mount`` (the new
    mount API, chroot): every sandbox inherits this filter."""
    allowed = _directives(SUPERVISOR, "SystemCallFilter")[0].split()
    assert {"mount", "umount2", "pivot_root", "mount_setattr"} <= set(allowed)
    assert "@mount" not in allowed
    for call in ("fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "chroot"):
        assert call not in allowed, call


def test_supervisor_cgroup_tree_is_read_only_but_its_own() -> None:
    """``ProtectControlGroups=`` makes cgroupfs read-only; the delegated subtree is writable
    again through ``ReadWritePaths=`` (tests/test_systemd_real.py checks it under systemd)."""
    assert _directives(SUPERVISOR, "ProtectControlGroups") == ["yes"]
    assert _directives(SUPERVISOR, "Delegate") == ["yes"]
    writable = _directives(SUPERVISOR, "ReadWritePaths")
    assert "-/sys/fs/cgroup/system.slice/privsep-supervisor.service" in writable
    assert all(p.endswith("/system.slice/privsep-supervisor.service") for p in writable)


def test_server_holds_no_privilege() -> None:
    assert _directives(SERVER, "User") == ["privsep"]
    assert _directives(SERVER, "CapabilityBoundingSet") == [""]
    assert _directives(SERVER, "NoNewPrivileges") == ["yes"]


def test_token_refresher_holds_the_key_and_no_privilege() -> None:
    """The refresher runs as its own user, with the key systemd hands it, Type=notify, and
    keeps the shared token's directory (0750) across its own restarts."""
    assert _directives(REFRESHER, "User") == ["privsep-refresher"]
    assert _directives(REFRESHER, "CapabilityBoundingSet") == [""]
    assert _directives(REFRESHER, "NoNewPrivileges") == ["yes"]
    assert _directives(REFRESHER, "Type") == ["notify"]
    assert _directives(REFRESHER, "ExecStart") == [f"{RUNNER} token-refresher"]
    assert _directives(REFRESHER, "LoadCredential") == [
        "supervisor.key:/etc/privsep/supervisor.key"
    ]
    assert "PRIVSEP__SUPERVISOR__CREDENTIAL=systemd:supervisor.key" in _directives(
        REFRESHER, "Environment"
    )
    assert _directives(REFRESHER, "RuntimeDirectory") == ["privsep-token"]
    assert _directives(REFRESHER, "RuntimeDirectoryMode") == ["0750"]
    assert _directives(REFRESHER, "RuntimeDirectoryPreserve") == ["restart"]


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None and not _STRICT, reason="no systemd-sysusers"
)
def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    """Both files, applied to an empty root, make the user and the directories the units use."""
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "privsep.sysusers")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert "privsep:" in (tmp_path / "etc" / "passwd").read_text()
    assert "privsep-refresher:" in (tmp_path / "etc" / "passwd").read_text()
    subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(UNITS / "privsep.tmpfiles")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for path, mode in (
        ("var/lib/privsep", 0o700),
        ("var/lib/privsep/state/logs", 0o700),
        ("var/log/privsep", 0o700),
        ("var/lib/privsep-server", 0o700),
    ):
        assert (tmp_path / path).stat().st_mode & 0o7777 == mode, path
    for unit in (SERVER, SUPERVISOR):
        for directive in ("StateDirectory", "RuntimeDirectory"):
            assert _directives(unit, directive), f"{unit.name} has no {directive}="
    # The supervisor writes attempt logs in its state directory; they land in LogsDirectory=.
    assert _directives(SUPERVISOR, "BindPaths") == ["/var/log/privsep:/var/lib/privsep/state/logs"]
