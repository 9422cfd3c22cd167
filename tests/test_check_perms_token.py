"""``runner check-perms`` for a supervisor behind ``runner token-refresher``.

With ``supervisor.session_token_file`` set, the supervisor holds no key: check-perms neither
demands nor resolves ``supervisor.credential`` (a ``systemd:`` name outside a unit would
otherwise be an error), and judges the token file instead, from the reader's side: readable by
the supervisor (here root), by nobody else, and not replaceable by group or others.
``--for token-refresher`` judges what the refresher holds: the key (or the keytab).
Run as root, through the real CLI, on real files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import clean_env, make_dir, run_runner, write_file
from test_check_perms import assert_clean, assert_violation, check_perms

REFRESHER_UID = 12346
TOKEN_GID = 12347

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown to the refresher")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return make_dir(tmp_path / "home", 0o700)


@pytest.fixture
def token_dir(home: Path) -> Path:
    """The token directory as systemd's RuntimeDirectory= makes it: the refresher's, 0750."""
    path = make_dir(home / "token", 0o750)
    os.chown(path, REFRESHER_UID, TOKEN_GID)
    return path


def _env(token_dir: Path, **more: str) -> dict[str, str]:
    return {
        "PRIVSEP__SUPERVISOR__SESSION_TOKEN_FILE": str(token_dir / "session"),
        "PRIVSEP__SUPERVISOR__CREDENTIAL": "systemd:supervisor.key",
        **more,
    }


def _token(token_dir: Path, mode: int = 0o640) -> Path:
    path = write_file(token_dir / "session", b'{"token": "t", "expires_at": 1}', mode=mode)
    os.chown(path, REFRESHER_UID, TOKEN_GID)
    return path


def test_no_key_is_demanded_or_resolved_behind_a_refresher(home: Path, token_dir: Path) -> None:
    _token(token_dir)
    result = check_perms(home, extra=_env(token_dir))
    assert_clean(result)
    assert "CREDENTIALS_DIRECTORY" not in result.stdout + result.stderr
    assert "supervisor.key" not in result.stdout


def test_a_loose_key_beside_is_not_the_supervisors_concern(home: Path, token_dir: Path) -> None:
    key = write_file(make_dir(home / "credentials") / "supervisor.key", mode=0o644)
    _token(token_dir)
    assert_clean(check_perms(home, extra=_env(token_dir, PRIVSEP__SUPERVISOR__CREDENTIAL=str(key))))
    # The refresher holds it, and is told.
    result = check_perms(
        home,
        "--for",
        "token-refresher",
        extra=_env(token_dir, PRIVSEP__SUPERVISOR__CREDENTIAL=str(key)),
    )
    assert_violation(result, key, "has mode 0644", fix=f"chmod 600 {key}")


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o604, 0o666])
def test_a_token_file_others_can_read_or_the_group_write_is_a_violation(
    home: Path, token_dir: Path, mode: int
) -> None:
    path = _token(token_dir, mode)
    result = check_perms(home, extra=_env(token_dir))
    assert_violation(result, path, f"has mode {mode:04o}", fix=f"chmod 640 {path}")


def test_a_token_directory_others_can_write_is_a_violation(home: Path, token_dir: Path) -> None:
    _token(token_dir)
    token_dir.chmod(0o777)
    result = check_perms(home, extra=_env(token_dir))
    assert_violation(
        result, token_dir, "token directory has mode 0777", fix=f"chmod go-w {token_dir}"
    )


def test_a_sticky_root_token_directory_is_allowed(home: Path, token_dir: Path) -> None:
    _token(token_dir)
    os.chown(token_dir, 0, 0)
    token_dir.chmod(0o1777)
    assert_clean(check_perms(home, extra=_env(token_dir)))


def test_a_token_file_that_is_a_symlink_is_a_violation(home: Path, token_dir: Path) -> None:
    real = _token(token_dir)
    real.rename(token_dir / "real")
    (token_dir / "session").symlink_to(token_dir / "real")
    result = check_perms(home, extra=_env(token_dir))
    assert result.returncode == 1, result.stdout
    assert f"{token_dir / 'session'}: cannot open" in result.stdout


def test_no_token_yet_is_absent_not_a_violation(home: Path, token_dir: Path) -> None:
    result = check_perms(home, extra=_env(token_dir))
    assert_clean(result)
    assert str(token_dir / "session") in result.stdout.split("not present yet")[-1]


def test_the_sandbox_uid_must_not_open_the_token(tmp_path: Path) -> None:
    # A fresh 0755 directory under /tmp, so that only the token's own mode stands in the way.
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="cpt-", dir="/tmp"))
    try:
        base.chmod(0o755)
        home = make_dir(base / "home", 0o700)
        token_dir = make_dir(base / "token", 0o755)
        os.chown(token_dir, REFRESHER_UID, TOKEN_GID)
        path = _token(token_dir, 0o644)
        result = run_runner("check-perms", env=clean_env(home, _env(token_dir)))
        assert "the sandbox uid 100000 can open this file" in result.stdout, result.stdout
        assert result.returncode == 1
        assert str(path) in result.stdout
    finally:
        shutil.rmtree(base)


def _read_only_bind(path: Path):  # type: ignore[no-untyped-def]
    """A ``preexec_fn``: in a private mount namespace, ``path`` is a read-only bind of itself
    (as a pod's shared emptyDir is in the supervisor's container)."""
    from privsep.sandbox import _libc as libc

    def enter() -> None:
        libc.unshare(libc.CLONE_NEWNS)
        libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE, None)
        libc.mount(str(path), str(path), None, libc.MS_BIND, None)
        flags = libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY
        libc.mount(None, str(path), None, flags, None)

    return enter


def test_a_world_writable_token_directory_on_a_read_only_mount_is_allowed(
    home: Path, token_dir: Path
) -> None:
    import subprocess
    import sys

    _token(token_dir)
    token_dir.chmod(0o777)  # what Kubernetes makes of an emptyDir
    argv = [sys.executable, "-m", "privsep", "check-perms"]
    env = clean_env(home, _env(token_dir))
    writable = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert writable.returncode == 1 and "token directory has mode 0777" in writable.stdout
    read_only = subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=_read_only_bind(token_dir),
    )
    assert_clean(read_only)
