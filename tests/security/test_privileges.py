"""Once dropped, privileges stay dropped: ids, groups, capabilities, setuid binaries."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from hostile_kit import ATTACKS, Hostile

from privsep.sandbox import ExitReason


def test_ids_groups_and_capabilities(hostile_any: Hostile) -> None:
    out = hostile_any.run("ids")
    uid = out.handle.uid
    assert uid is not None and uid >= 1000
    assert out.report["uid"] == [uid] * 3
    assert out.report["gid"] == [uid] * 3  # no gid 0 anywhere
    assert out.report["groups"] == []
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(out.report[key], 16) == 0, (key, out.report[key])
    assert out.report["NoNewPrivs"] == "1"
    assert out.report["Seccomp"] == "2"


def test_cannot_regain_root(hostile_any: Hostile) -> None:
    out = hostile_any.run("regain_root")
    report = out.report
    for name in ("setresuid", "setuid", "seteuid", "setgid", "setgroups"):
        assert report[name] == "EPERM", (name, report[name])
    assert report["unshare_user"] == "EPERM"
    assert report["clone_newuser"] == "EPERM"
    assert report["clone3"] == "ENOSYS"  # so glibc falls back to the filterable clone()
    uid = out.handle.uid
    assert report["ids_after"] == [[uid] * 3, [uid] * 3]


def test_setuid_root_binary_does_not_grant_root(hostile: Hostile, workroot: Path) -> None:
    bundle = workroot / "suid"
    bundle.mkdir(mode=0o755)
    target = bundle / "id"
    shutil.copy2("/usr/bin/id", target)
    os.chown(target, 0, 0)
    os.chmod(target, 0o4755)
    assert os.stat(target).st_mode & stat.S_ISUID
    out = hostile.run("setuid_binary", str(target), bundle_paths=(str(ATTACKS), str(bundle)))
    assert out.status.ok, out.log
    uid = out.handle.uid
    assert out.report["rc"] == 0
    assert out.report["out"].startswith(f"uid={uid}")
    assert "euid=0" not in out.report["out"] and "uid=0" not in out.report["out"]


def test_code_and_system_paths_are_read_only(hostile: Hostile) -> None:
    out = hostile.run("write_readonly", "/", "/usr", "/etc", str(ATTACKS), "/tmp")
    assert out.report["/"] in ("EROFS", "EACCES")
    for path in ("/usr", "/etc", str(ATTACKS)):
        assert out.report[path] in ("EROFS", "EACCES"), (path, out.report[path])
    assert out.report["/tmp"] == "wrote"  # the private tmpfs is the writable scratch space
    assert out.status.reason is ExitReason.SUCCEEDED


def test_mount_flags_read_only_nosuid_nodev(hostile: Hostile, workroot: Path) -> None:
    """Every mount is nosuid; all but /dev and its device binds are nodev; all but the work
    dir and the scratch filesystems are read-only, and those flags hold against real attempts:
    a device node and a world-writable file in the bundle stay unusable."""
    bundle = workroot / "flags"
    bundle.mkdir(mode=0o755)
    device, writable = bundle / "null", bundle / "open"
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    os.chmod(device, 0o666)
    writable.write_bytes(b"")
    writable.chmod(0o666)
    spec_bundles = (str(ATTACKS), str(bundle))
    out = hostile.run(
        "mount_flags", str(device), str(writable), bundle_paths=spec_bundles, timeout=60
    )
    assert out.status.ok, out.log
    assert out.report["device"] == "EACCES"  # nodev
    assert out.report["write"] == "EROFS"  # read-only mount, not file permissions
    assert out.report["urandom"] == 8
    mounts: dict[str, list[str]] = out.report["mounts"]
    devices = {"/dev", *(f"/dev/{name}" for name in ("null", "zero", "full", "random", "urandom"))}
    writable_points = {"/tmp", "/dev/shm", "/proc"}
    rw = [point for point, flags in mounts.items() if "ro" not in flags]
    assert len(mounts) > 10, mounts
    for point, flags in mounts.items():
        assert "nosuid" in flags, (point, flags)
        assert ("nodev" in flags) == (point not in devices), (point, flags)
    extra_rw = set(rw) - writable_points
    assert len(extra_rw) == 1 and next(iter(extra_rw)).startswith(str(workroot)), rw
    assert "ro" in mounts[str(bundle)] and "ro" in mounts["/"] and "ro" in mounts["/usr"]
