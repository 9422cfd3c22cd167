"""``runner check-perms`` end to end: the real CLI in a subprocess, real files, run as root.

Each test builds a private ``PRIVSEP_HOME`` under ``tmp_path`` (whose parents are root-owned
0700 directories and the sticky ``/tmp``, so the parent-directory rule passes there unless a
test breaks it on purpose) and asserts the exit status and what the command says: the path,
the problem and the exact fix.

The sandbox-uid probe tests are the exception: the sandbox uid cannot traverse the 0700
directories pytest puts above ``tmp_path``, so they build their home in a fresh 0755 directory
directly under ``/tmp`` (removed afterwards), where a loose file really is reachable.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import clean_env, finding_line, make_dir, run_runner, write_file

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: chown to another uid / the sandbox-uid probe"
)

OTHER_UID = 12345
SANDBOX_UID = 100_000  # the default sandbox.uid_first


def user_name(uid: int) -> str:
    """How check-perms names a uid: the account name, or the number when there is none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


ME = user_name(os.geteuid())


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return make_dir(tmp_path / "home", 0o700)


@pytest.fixture
def key(home: Path) -> Path:
    """Where the supervisor credential lives by default; its 0700 directory exists."""
    make_dir(home / "credentials", 0o700)
    return home / "credentials" / "supervisor.key"


def check_perms(home: Path, *args: str, extra: dict[str, str] | None = None, timeout: float = 20):
    result = run_runner("check-perms", *args, env=clean_env(home, extra), timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def check_json(home: Path, extra: dict[str, str] | None = None) -> tuple[int, dict]:
    result = check_perms(home, "--json", extra=extra)
    return result.returncode, json.loads(result.stdout)


def assert_violation(result, path: Path | str, *words: str, fix: str) -> str:
    """Exit status 1 and a line naming ``path`` with ``words`` that ends with ``fix``."""
    out = result.stdout
    assert result.returncode == 1, f"exit {result.returncode}\n{out}\n{result.stderr}"
    line = finding_line(out, path, *words)
    assert line.endswith(f"; fix: {fix}"), line
    return line


def assert_clean(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert " 0 problems" in result.stdout, result.stdout


# --- the supervisor credential: modes ---------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_loose_mode_is_a_violation(home: Path, key: Path, mode: int) -> None:
    write_file(key, mode=mode)
    result = check_perms(home)
    assert_violation(result, key, f"has mode {mode:04o}", "group or others", fix=f"chmod 600 {key}")
    assert "1 problem," in result.stdout


def test_loose_read_only_mode_is_fixed_to_0400(home: Path, key: Path) -> None:
    write_file(key, mode=0o444)
    assert_violation(check_perms(home), key, "has mode 0444", fix=f"chmod 400 {key}")


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_mode_is_clean(home: Path, key: Path, mode: int) -> None:
    write_file(key, mode=mode)
    result = check_perms(home)
    assert_clean(result)
    assert result.stderr == ""
    assert str(key) not in result.stdout.split("not present yet")[-1]  # checked, not absent


def test_key_made_by_credentials_create_is_clean(home: Path) -> None:
    key = home / "credentials" / "supervisor.key"
    created = run_runner("credentials", "create", "--out", key, env=clean_env(home))
    assert created.returncode == 0, created.stderr
    assert_clean(check_perms(home))


def test_empty_home_is_clean_and_reports_what_is_absent(home: Path) -> None:
    result = check_perms(home)
    assert_clean(result)
    assert "not present yet" in result.stdout
    assert str(home / "credentials" / "supervisor.key") in result.stdout


def test_fix_command_quotes_a_path_with_spaces(tmp_path: Path) -> None:
    home = make_dir(tmp_path / "my home", 0o700)
    make_dir(home / "credentials", 0o700)
    key = write_file(home / "credentials" / "supervisor.key", mode=0o644)
    assert_violation(check_perms(home), key, "mode 0644", fix=f"chmod 600 {shlex.quote(str(key))}")


# --- the supervisor credential: what it is ----------------------------------------------------


def test_symlink_to_a_good_file_is_a_violation(home: Path, key: Path) -> None:
    good = write_file(key.parent / "real.key")
    key.symlink_to(good)
    result = check_perms(home)
    line = assert_violation(
        result, key, "symbolic link", fix=f'cp --remove-destination "$(readlink -f {key})" {key}'
    )
    assert "real.key" not in line.split("; fix:")[0]  # the finding is about the link itself


def test_dangling_symlink_is_a_violation_not_absent(home: Path, key: Path) -> None:
    key.symlink_to(key.parent / "nowhere")
    result = check_perms(home)
    assert_violation(
        result, key, "symbolic link", fix=f'cp --remove-destination "$(readlink -f {key})" {key}'
    )


def test_hard_link_is_a_violation(home: Path, key: Path) -> None:
    write_file(key)
    os.link(key, key.parent / "another-name")
    result = check_perms(home)
    assert_violation(
        result,
        key,
        "has 2 hard links",
        fix=f"cp -p {key} {key}.new && mv -f {key}.new {key}",
    )


def test_fifo_is_a_violation_and_does_not_hang(home: Path, key: Path) -> None:
    os.mkfifo(key, 0o600)
    # Nobody ever writes to the FIFO: a blocking open would hang until the timeout.
    result = check_perms(home, timeout=10)
    assert_violation(
        result,
        key,
        "is a FIFO, not a regular file",
        fix=f"mv {key} {key}.bad  # then put the real file there",
    )


def test_directory_in_place_of_the_file_is_a_violation(home: Path, key: Path) -> None:
    make_dir(key, 0o700)
    result = check_perms(home)
    assert_violation(
        result,
        key,
        "is a directory, not a regular file",
        fix=f"mv {key} {key}.bad  # then put the real file there",
    )


@requires_root
def test_file_owned_by_another_uid_is_a_violation(home: Path, key: Path) -> None:
    write_file(key)
    os.chown(key, OTHER_UID, OTHER_UID)
    result = check_perms(home)
    assert_violation(result, key, f"is owned by {user_name(OTHER_UID)}", fix=f"chown {ME} {key}")


# --- the directories above it -----------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o707])
def test_parent_writable_by_others_is_a_violation(home: Path, key: Path, mode: int) -> None:
    write_file(key)
    os.chmod(key.parent, mode)
    parent = os.path.realpath(key.parent)
    result = check_perms(home)
    assert_violation(
        result,
        parent,
        "parent directory is writable by group or others",
        f"(mode {mode:04o})",
        fix=f"chmod go-w {parent}",
    )


def test_grandparent_writable_by_others_is_a_violation(home: Path, key: Path) -> None:
    write_file(key)
    os.chmod(home, 0o777)
    result = check_perms(home)
    assert_violation(
        result,
        os.path.realpath(home),
        "writable by group or others",
        fix=f"chmod go-w {os.path.realpath(home)}",
    )


@requires_root
def test_sticky_root_owned_parent_is_allowed(home: Path) -> None:
    shared = make_dir(home / "credentials", 0o1777)  # like /tmp: root-owned, sticky
    assert os.stat(shared).st_uid == 0
    write_file(shared / "supervisor.key")
    assert_clean(check_perms(home))


@requires_root
def test_sticky_parent_owned_by_someone_else_is_a_violation(home: Path) -> None:
    shared = make_dir(home / "credentials", 0o1777)
    os.chown(shared, OTHER_UID, OTHER_UID)
    write_file(shared / "supervisor.key")
    parent = os.path.realpath(shared)
    result = check_perms(home)
    assert_violation(result, parent, "writable by group or others", fix=f"chmod go-w {parent}")
    assert_violation(
        result,
        parent,
        f"parent directory is owned by {user_name(OTHER_UID)}",
        fix=f"chown {ME} {parent}",
    )


# --- the config file, _file secrets -----------------------------------------------------------


def write_config(path: Path, text: str, mode: int) -> Path:
    return write_file(path, text.encode(), mode=mode)


def test_config_file_holding_a_secret_must_be_private(home: Path) -> None:
    config = write_config(home / "privsep.toml", '[database]\nurl = "sqlite:///x"\n', 0o644)
    result = check_perms(home)
    assert_violation(result, config, "has mode 0644", fix=f"chmod 600 {config}")

    os.chmod(config, 0o600)
    assert_clean(check_perms(home))


def test_config_file_named_by_flag_is_checked(tmp_path: Path, home: Path) -> None:
    config = write_config(tmp_path / "elsewhere.toml", '[database]\nurl = "sqlite:///x"\n', 0o640)
    result = run_runner("--config", config, "check-perms", env=clean_env(home))
    assert_violation(result, config, "has mode 0640", fix=f"chmod 600 {config}")


def test_config_file_without_a_secret_may_be_readable(home: Path) -> None:
    write_config(home / "privsep.toml", '[supervisor]\nexecutor = "sequential"\n', 0o644)
    assert_clean(check_perms(home))


def test_config_file_holding_an_overridden_secret_is_still_checked(home: Path) -> None:
    config = write_config(
        home / "privsep.toml", '[database]\nurl = "postgresql://u:hunter2@db/x"\n', 0o644
    )
    result = check_perms(home, extra={"PRIVSEP__DATABASE__URL": "sqlite:///y"})
    assert_violation(result, config, "has mode 0644", fix=f"chmod 600 {config}")


def test_file_secret_from_environment_is_checked(tmp_path: Path, home: Path) -> None:
    secrets = make_dir(tmp_path / "secrets", 0o700)
    url_file = write_file(secrets / "db-url", b"sqlite:///x\n", mode=0o644)
    extra = {"PRIVSEP__DATABASE__URL_FILE": str(url_file)}
    result = check_perms(home, extra=extra)
    assert_violation(result, url_file, "has mode 0644", fix=f"chmod 600 {url_file}")

    os.chmod(url_file, 0o600)
    assert_clean(check_perms(home, extra=extra))


def test_file_secret_from_config_file_is_checked(tmp_path: Path, home: Path) -> None:
    key_file = write_file(tmp_path / "fernet.key", b"k" * 44 + b"\n", mode=0o604)
    write_config(home / "privsep.toml", f'[server]\nfernet_key_file = "{key_file}"\n', 0o644)
    result = check_perms(home)
    assert_violation(result, key_file, "has mode 0604", fix=f"chmod 600 {key_file}")


# --- the key ring and the state directories ---------------------------------------------------


@pytest.fixture
def ring(home: Path) -> Path:
    make_dir(home / "keys", 0o700)
    return make_dir(home / "keys" / "signing", 0o700)


def test_key_ring_directory_readable_by_others_is_a_violation(home: Path, ring: Path) -> None:
    write_file(ring / "2024-01.key")
    os.chmod(ring, 0o755)
    result = check_perms(home)
    assert_violation(result, ring, "directory has mode 0755", fix=f"chmod 700 {ring}")


def test_loose_key_in_the_ring_is_a_violation(home: Path, ring: Path) -> None:
    write_file(ring / "2024-01.key")
    loose = write_file(ring / "2024-02.key", mode=0o644)
    result = check_perms(home)
    assert_violation(result, loose, "has mode 0644", fix=f"chmod 600 {loose}")
    assert "1 problem," in result.stdout


def test_public_keys_in_the_ring_are_ignored(home: Path, ring: Path) -> None:
    private = write_file(ring / "2024-01.key")
    write_file(ring / "2024-01.key.pub", b"public\n", mode=0o644)
    write_file(ring / "other.pub", b"public\n", mode=0o666)
    code, report = check_json(home)
    assert code == 0, report
    assert report["ok"] is True
    assert report["findings"] == []
    assert str(private) in report["checked"]
    assert not [p for p in report["checked"] if p.endswith(".pub")]


def test_key_ring_that_is_a_symlink_is_a_violation(home: Path, tmp_path: Path) -> None:
    make_dir(home / "keys", 0o700)
    real = make_dir(tmp_path / "real-ring", 0o700)
    ring = home / "keys" / "signing"
    ring.symlink_to(real)
    result = check_perms(home)
    assert_violation(
        result,
        ring,
        "is a symbolic link, not a directory",
        fix=f"mv {ring} {ring}.bad && mkdir -m 700 {ring}",
    )


def test_socket_in_the_key_ring_is_a_finding_not_a_crash(home: Path, ring: Path) -> None:
    sock_path = ring / "agent.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        result = run_runner("check-perms", env=clean_env(home))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    finding_line(result.stdout, sock_path)


@pytest.mark.parametrize(
    ("name", "mode", "fix_mode"),
    [
        ("state", 0o777, "750"),
        ("state", 0o770, "750"),
        ("state", 0o705, "700"),
        ("run", 0o777, "755"),
        ("run", 0o775, "755"),
    ],
)
def test_loose_state_directories_are_violations(
    home: Path, name: str, mode: int, fix_mode: str
) -> None:
    state = make_dir(home / name, mode)
    result = check_perms(home)
    assert_violation(
        result, state, f"directory has mode {mode:04o}", fix=f"chmod {fix_mode} {state}"
    )


@pytest.mark.parametrize(("name", "mode"), [("state", 0o750), ("state", 0o700), ("run", 0o755)])
def test_state_directories_may_be_traversable(home: Path, name: str, mode: int) -> None:
    make_dir(home / name, mode)
    assert_clean(check_perms(home))


def test_fifo_in_place_of_a_state_directory_does_not_hang(home: Path) -> None:
    state = home / "state"
    os.mkfifo(state, 0o600)
    result = check_perms(home, timeout=10)
    assert_violation(
        result, state, "not a directory", fix=f"mv {state} {state}.bad && mkdir -m 700 {state}"
    )


# --- machine-readable output ------------------------------------------------------------------


def test_json_report_of_a_violation(home: Path, key: Path) -> None:
    write_file(key, mode=0o644)
    code, report = check_json(home)
    assert code == 1
    assert report["ok"] is False
    assert report["findings"] == [
        {
            "path": str(key),
            "problem": "has mode 0644: group or others have access",
            "fix": f"chmod 600 {key}",
        }
    ]
    assert str(key) in report["checked"]
    assert str(key) not in report["absent"]
    assert str(home / "credentials" / "operator.key") in report["absent"]
    if os.geteuid() == 0:
        assert report["probe_uid"] == SANDBOX_UID
        assert report["probe_note"] == ""


def test_json_report_when_clean(home: Path, key: Path) -> None:
    write_file(key)
    code, report = check_json(home)
    assert code == 0
    assert report["ok"] is True
    assert report["findings"] == []
    assert set(report) == {"ok", "findings", "checked", "absent", "probe_uid", "probe_note"}


def test_json_report_lists_several_findings(home: Path, key: Path) -> None:
    write_file(key, mode=0o640)
    make_dir(home / "state", 0o777)
    code, report = check_json(home)
    assert code == 1
    paths = sorted(f["path"] for f in report["findings"])
    assert paths == sorted([str(key), str(home / "state")])
    assert all(f["fix"] for f in report["findings"])


# --- configuration errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [{"PRIVSEP__NOPE__X": "1"}, {"PRIVSEP__SANDBOX__UID_FIRST": "zero"}],
)
def test_configuration_error_exits_2_without_traceback(home: Path, extra: dict[str, str]) -> None:
    result = run_runner("check-perms", env=clean_env(home, extra))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("runner: configuration error:"), result.stderr
    assert next(iter(extra)) in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_config_file_exits_2_naming_it(home: Path) -> None:
    config = write_config(home / "privsep.toml", "[database]\nurl = 5\n", 0o600)
    result = run_runner("check-perms", env=clean_env(home))
    assert result.returncode == 2
    assert result.stderr.startswith(f"runner: configuration error: {config}:2:"), result.stderr
    assert "Traceback" not in result.stderr


# --- the sandbox-uid probe, for real ----------------------------------------------------------


@pytest.fixture
def world_home() -> Iterator[Path]:
    """A home in a 0755 tree under the sticky ``/tmp``: the sandbox uid can reach into it."""
    base = Path(tempfile.mkdtemp(prefix="privsep-probe-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        home = make_dir(base / "home", 0o755)
        make_dir(home / "credentials", 0o755)
        yield home
    finally:
        shutil.rmtree(base)


@requires_root
def test_probe_catches_a_file_the_sandbox_can_open(world_home: Path) -> None:
    key = write_file(world_home / "credentials" / "supervisor.key", mode=0o604)
    result = check_perms(world_home)
    assert_violation(result, key, "has mode 0604", fix=f"chmod 600 {key}")
    assert_violation(
        result, key, f"the sandbox uid {SANDBOX_UID} can open this file", fix=f"chmod go-rwx {key}"
    )
    assert "could open none" not in result.stdout

    code, report = check_json(world_home)
    assert code == 1
    assert report["probe_uid"] == SANDBOX_UID
    problems = [f["problem"] for f in report["findings"] if f["path"] == str(key)]
    assert f"the sandbox uid {SANDBOX_UID} can open this file" in problems


@requires_root
def test_probe_finds_nothing_when_the_file_is_private(world_home: Path) -> None:
    write_file(world_home / "credentials" / "supervisor.key", mode=0o600)
    make_dir(world_home / "state", 0o750)
    result = check_perms(world_home)
    assert_clean(result)
    assert f"sandbox uid {SANDBOX_UID} could open none" in result.stdout

    code, report = check_json(world_home)
    assert code == 0
    assert report["probe_uid"] == SANDBOX_UID


@requires_root
def test_probe_catches_a_readable_key_ring_directory(world_home: Path) -> None:
    make_dir(world_home / "keys", 0o755)
    ring = make_dir(world_home / "keys" / "signing", 0o755)
    result = check_perms(world_home)
    assert_violation(result, ring, "directory has mode 0755", fix=f"chmod 700 {ring}")
    assert_violation(
        result,
        ring,
        f"the sandbox uid {SANDBOX_UID} can open this directory",
        fix=f"chmod go-rwx {ring}",
    )


@requires_root
def test_probe_runs_as_the_configured_uid(world_home: Path) -> None:
    """A 0600 file owned by uid U opens only for U (or root): the probe must really be U."""
    uid = 100_123
    key = write_file(world_home / "credentials" / "supervisor.key", mode=0o600)
    os.chown(key, uid, uid)
    extra = {"PRIVSEP__SANDBOX__UID_FIRST": str(uid)}

    result = check_perms(world_home, extra=extra)
    assert_violation(result, key, f"is owned by {user_name(uid)}", fix=f"chown {ME} {key}")
    assert_violation(
        result, key, f"the sandbox uid {uid} can open this file", fix=f"chmod go-rwx {key}"
    )
    code, report = check_json(world_home, extra=extra)
    assert code == 1
    assert report["probe_uid"] == uid

    # The same tree probed as the default uid: the static finding stays, the probe opens nothing.
    result = check_perms(world_home)
    assert_violation(result, key, f"is owned by {user_name(uid)}", fix=f"chown {ME} {key}")
    assert "can open" not in result.stdout


@requires_root
def test_probe_fix_quotes_a_path_with_spaces(world_home: Path) -> None:
    spaced = make_dir(world_home / "my keys", 0o755)
    key = write_file(spaced / "supervisor.key", mode=0o604)
    extra = {"PRIVSEP__SUPERVISOR__CREDENTIAL": str(key)}
    result = check_perms(world_home, extra=extra)
    assert_violation(result, key, "can open this file", fix=f"chmod go-rwx {shlex.quote(str(key))}")


def test_a_workflow_file_the_sandbox_cannot_read_is_reported(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    flows = tmp_path / "flows"
    flows.mkdir(mode=0o755)
    good = flows / "good.py"
    good.write_text("x = 1\n")
    good.chmod(0o644)
    env = clean_env(home, {"PRIVSEP__CORE__WORKFLOWS_DIR": str(flows)})
    assert run_runner("check-perms", env=env).returncode == 0
    secret = flows / "private.py"
    secret.write_text("x = 2\n")
    secret.chmod(0o600)
    result = run_runner("check-perms", env=env)
    assert result.returncode == 1
    line = finding_line(result.stdout, secret, "sandboxes cannot read this workflow path")
    assert "chmod" in line


# --- the workflows folder: nobody but its owner may swap it -----------------------------------


def _workflows_in(parent: Path, mode: int) -> Path:
    make_dir(parent, mode)
    folder = make_dir(parent / "flows", 0o755)
    (folder / "wf.py").write_text("X = 1\n")
    return folder


def test_workflows_folder_in_a_directory_others_may_write_is_a_violation(
    home: Path, tmp_path: Path
) -> None:
    # Whoever writes "shared" can replace "flows" with a link to /etc, and root's
    # discovery would then read and copy what is there.
    folder = _workflows_in(tmp_path / "shared", 0o777)
    result = check_perms(home, extra={"PRIVSEP__CORE__WORKFLOWS_DIR": str(folder)})
    assert_violation(
        result,
        tmp_path / "shared",
        "writable by group or others",
        "could replace the workflows folder",
        fix=f"chmod go-w {tmp_path / 'shared'}",
    )


def test_a_symlinked_workflows_folder_is_judged_by_both_paths(home: Path, tmp_path: Path) -> None:
    target = _workflows_in(tmp_path / "releases", 0o777)  # where the link points: open to all
    make_dir(tmp_path / "srv", 0o755)
    (tmp_path / "srv" / "flows").symlink_to(target)
    result = check_perms(home, extra={"PRIVSEP__CORE__WORKFLOWS_DIR": str(tmp_path / "srv/flows")})
    assert_violation(
        result,
        tmp_path / "releases",
        "could replace the workflows folder",
        fix=f"chmod go-w {tmp_path / 'releases'}",
    )


def test_a_workflows_folder_its_authors_write_in_is_clean(home: Path, tmp_path: Path) -> None:
    folder = _workflows_in(tmp_path / "srv", 0o755)
    folder.chmod(0o777)  # writing inside the folder is what authors do
    assert_clean(check_perms(home, extra={"PRIVSEP__CORE__WORKFLOWS_DIR": str(folder)}))


# -- what root trusts without it being a secret: the configuration file and _cmd executables --


def test_config_file_others_may_write_is_a_violation(home: Path) -> None:
    config = write_config(home / "privsep.toml", '[supervisor]\nexecutor = "sequential"\n', 0o666)
    result = check_perms(home)
    assert_violation(result, config, "writable by group or others", fix=f"chmod go-w {config}")
    os.chmod(config, 0o644)
    assert_clean(check_perms(home))


@requires_root
def test_config_file_owned_by_another_user_is_a_violation(home: Path) -> None:
    config = write_config(home / "privsep.toml", '[supervisor]\nexecutor = "sequential"\n', 0o644)
    os.chown(config, OTHER_UID, -1)
    result = check_perms(home)
    assert_violation(result, config, f"owned by {user_name(OTHER_UID)}", fix=f"chown {ME} {config}")


def _command_config(home: Path, executable: Path) -> Path:
    return write_config(
        home / "privsep.toml", f'[database]\nurl_cmd = "{executable} --print"\n', 0o600
    )


def test_a_cmd_executable_others_may_write_is_a_violation(tmp_path: Path, home: Path) -> None:
    tools = make_dir(tmp_path / "tools", 0o755)
    tool = write_file(tools / "db-url", b"#!/bin/sh\necho sqlite:///x\n", mode=0o777)
    _command_config(home, tool)
    result = check_perms(home)
    assert_violation(result, tool, "writable by group or others", fix=f"chmod go-w {tool}")
    os.chmod(tool, 0o755)
    assert_clean(check_perms(home))


def test_a_directory_above_a_cmd_executable_is_checked(tmp_path: Path, home: Path) -> None:
    tools = make_dir(tmp_path / "tools", 0o777)
    tool = write_file(tools / "db-url", b"#!/bin/sh\necho sqlite:///x\n", mode=0o755)
    _command_config(home, tool)
    result = check_perms(home)
    assert_violation(result, tools, "parent directory is writable", fix=f"chmod go-w {tools}")


def test_a_cmd_from_the_environment_is_found_on_path(tmp_path: Path, home: Path) -> None:
    tools = make_dir(tmp_path / "bin", 0o755)
    tool = write_file(tools / "fernet-key", b"#!/bin/sh\necho k\n", mode=0o775)
    extra = {
        "PRIVSEP__SERVER__FERNET_KEY_CMD": "fernet-key",
        "PATH": f"{tools}:{os.environ['PATH']}",
    }
    result = check_perms(home, extra=extra)
    assert_violation(result, tool, "writable by group or others", fix=f"chmod go-w {tool}")


def test_a_symlinked_cmd_executable_is_judged_by_its_target(tmp_path: Path, home: Path) -> None:
    loose = make_dir(tmp_path / "loose", 0o755)
    target = write_file(loose / "real-tool", b"#!/bin/sh\necho x\n", mode=0o757)
    tools = make_dir(tmp_path / "tools", 0o755)
    link = tools / "tool"
    link.symlink_to(target)
    _command_config(home, link)
    result = check_perms(home)
    assert_violation(result, target, "writable by group or others", fix=f"chmod go-w {target}")
