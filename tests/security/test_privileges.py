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
