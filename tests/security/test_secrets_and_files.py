"""The child cannot reach the supervisor's secrets: not in /proc, files, env, memory or fds."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from hostile_kit import ATTACKS, SECRET, SECRET_SHA256, Hostile

from helpers import readable_memory
from privsep.sandbox import ExitReason


def test_supervisor_proc_entries_are_out_of_reach(hostile_any: Hostile) -> None:
    out = hostile_any.run("supervisor_proc", str(os.getpid()))
    assert out.status.reason is ExitReason.SUCCEEDED, out.log
    for name in ("environ", "mem", "cmdline", "status", "maps", "fd"):
        assert out.report[name] == "ENOENT", (name, out.report[name])
    # Its own PID namespace: nothing but the sandbox's own process.
    assert out.report["visible_pids"] == [1]


def test_secret_is_nowhere_in_env_memory_or_fds(hostile_any: Hostile) -> None:
    out = hostile_any.run("find_secret", SECRET_SHA256)
    assert out.status.reason is ExitReason.SUCCEEDED, out.log
    report = out.report
    assert report["env_names"] == []  # not even NOTIFY_SOCKET, LISTEN_FDS, PRIVSEP__*
    assert report["in_env"] is False and report["in_proc_environ"] is False
    assert report["in_cmdline"] is False
    assert report["memory_scanned_mb"] > 5  # the scan really read the interpreter's memory
    assert report["in_memory"] is False
    assert report["in_fds"] == []
    assert SECRET.decode() not in out.log


def test_only_stdio_is_open(hostile_any: Hostile) -> None:
    out = hostile_any.run("open_fds")
    fds = out.report["fds"]
    assert sorted(fds) == ["0", "1", "2"], fds
    assert fds["0"] == "/dev/null"
    assert fds["1"].startswith("pipe:") and fds["1"] == fds["2"]


def _plant_state(root: Path) -> dict[str, Path]:
    files = {
        "db": root / "state" / "privsep.sqlite",
        "config": root / "config" / "privsep.toml",
        "credential": root / "credentials" / "supervisor.key",
    }
    for path in files.values():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_bytes(SECRET)
        path.chmod(0o600)
    return files


def test_state_config_and_credentials_outside_the_bundle_are_absent(
    hostile: Hostile, workroot: Path
) -> None:
    files = _plant_state(workroot / "home")
    paths = [str(p) for p in files.values()] + [str(workroot / "home"), "/etc/shadow", "/root"]
    out = hostile.run("read_files", *paths)
    for path in files.values():
        assert out.report[str(path)] == "ENOENT"
    assert out.report[str(workroot / "home")] == "ENOENT"
    # Only the skeleton that leads to the interpreter (/root/.pyenv/...), nothing else of /root.
    assert out.report["/root"] == "LIST:.pyenv"
    assert out.report["/etc/shadow"] == "EACCES"


def test_hidden_paths_inside_the_bundle_stay_hidden(hostile: Hostile, workroot: Path) -> None:
    home = workroot / "home"
    files = _plant_state(home)
    home.chmod(0o755)
    single = home / "bundle.env"
    single.write_bytes(SECRET)
    single.chmod(0o644)  # readable on purpose: only the hiding protects it
    (home / "state").chmod(0o755)
    files["db"].chmod(0o644)
    hidden = (str(home / "state"), str(home / "config"), str(home / "credentials"), str(single))
    paths = [str(p) for p in files.values()] + [*hidden]
    out = hostile.run(
        "read_files", *paths, bundle_paths=(str(ATTACKS), str(home)), hidden_paths=hidden
    )
    assert out.status.ok, out.log
    for path in (str(p) for p in files.values()):
        assert not str(out.report[path]).startswith("READ"), (path, out.report[path])
    for directory in hidden[:3]:
        assert out.report[directory] == "EACCES"  # an empty mode-000 tmpfs on top
    assert out.report[str(single)] == "EACCES"  # /dev/null on a nodev mount


def _memory_has(pid: int, needle: bytes) -> bool:
    return any(needle in data for data in readable_memory(pid))


def _fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile (or the listing's own)
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return out


def test_template_zygote_and_prewarmed_sandboxes_hold_no_secret(hostile: Hostile) -> None:
    backend = hostile.backend
    hostile.run("ids")  # make sure the zygote has served requests in this session
    zygote = backend.zygote_pid
    assert zygote is not None
    with open(f"/proc/{zygote}/environ", "rb") as fh:
        assert fh.read() == b""  # exec'd with an empty environment
    # Beyond stdio: the control socket, its own PID namespace, the signal wake-up pipe and the
    # lifeline pipe (both ends each), and the status pipe of each live sandbox it will report
    # on (whose read end we, the supervisor, hold). Never the planted inheritable fd.
    for _ in range(20):  # a pre-warmed sandbox may be forked between the two listings
        ours = set(_fd_targets(os.getpid()).values())
        fds = _fd_targets(zygote)
        assert not any("supervisor.key" in t for t in fds.values())
        beyond_stdio = sorted(t for fd, t in fds.items() if fd > 2)
        assert [t for t in beyond_stdio if not t.startswith("pipe:")] == [
            os.readlink(f"/proc/{zygote}/ns/pid"),
            next(t for t in beyond_stdio if t.startswith("socket:")),
        ]
        pipes = [t for t in beyond_stdio if t.startswith("pipe:")]
        own_pipes = {t for t in pipes if pipes.count(t) == 2}
        assert len(own_pipes) == 2  # wake-up and lifeline
        status_pipes = [t for t in pipes if t not in own_pipes]
        if all(t in ours for t in status_pipes):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the zygote holds pipes that are not sandbox status pipes: {fds}")
    with open(f"/proc/{zygote}/cmdline", "rb") as fh:
        assert SECRET not in fh.read()
    assert not _memory_has(zygote, SECRET)
    for pid in backend.warm_pids():
        assert not _memory_has(pid, SECRET)
