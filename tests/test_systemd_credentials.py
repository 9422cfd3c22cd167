"""``supervisor.credential = "systemd:NAME"``: the key systemd's ``LoadCredential=`` delivers.

Every test lays out a real directory the way systemd does for a root service (the directory
0500, the file 0400, both root's) and points ``CREDENTIALS_DIRECTORY`` at it, then drives the
real loader, the real ``runner`` command and the supervisor's own settings.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import clean_env, make_dir, run_runner, write_file
from privsep.runner.config.loader import ConfigError, load_config
from privsep.runner.supervisor.settings import SupervisorSettings
from privsep.secrets.keys import generate_ed25519_pem

SYSTEMD_VALUE = "systemd:supervisor.key"

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="systemd's layout is root's")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return make_dir(tmp_path / "home", 0o700)


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    """``/run/credentials/privsep-supervisor.service`` in miniature: 0500 dir, 0400 key."""
    run = make_dir(tmp_path / "run-credentials", 0o755)
    unit = make_dir(run / "privsep-supervisor.service", 0o700)
    private_pem, _ = generate_ed25519_pem()
    write_file(unit / "supervisor.key", private_pem, mode=0o400)
    unit.chmod(0o500)
    return unit


def env_for(home: Path, credentials: Path | None, value: str = SYSTEMD_VALUE) -> dict[str, str]:
    extra = {"PRIVSEP__SUPERVISOR__CREDENTIAL": value}
    if credentials is not None:
        extra["CREDENTIALS_DIRECTORY"] = str(credentials)
    env = clean_env(home, extra)
    if credentials is None:
        env.pop("CREDENTIALS_DIRECTORY", None)
    return env


def test_the_value_resolves_in_the_credentials_directory(home: Path, credentials: Path) -> None:
    cfg = load_config(environ=env_for(home, credentials))
    assert cfg.path_of("supervisor.credential") == credentials / "supervisor.key"
    assert cfg.systemd_credential("supervisor.credential") == "supervisor.key"
    assert cfg.systemd_credential("operator.credential") is None
    # The supervisor, unchanged, reads its key from there.
    settings = SupervisorSettings.from_config(cfg)
    assert settings.credential == str(credentials / "supervisor.key")
    assert settings.credential in settings.hidden_paths


def test_the_file_in_the_config_works_too(home: Path, credentials: Path) -> None:
    write_file(home / "privsep.toml", f'[supervisor]\ncredential = "{SYSTEMD_VALUE}"\n'.encode())
    env = env_for(home, credentials)
    env.pop("PRIVSEP__SUPERVISOR__CREDENTIAL")
    cfg = load_config(environ=env)
    assert cfg.path_of("supervisor.credential") == credentials / "supervisor.key"


def test_unset_credentials_directory_is_one_clear_line(home: Path) -> None:
    cfg = load_config(environ=env_for(home, None))  # loading alone does not need it
    with pytest.raises(ConfigError, match=r"\$CREDENTIALS_DIRECTORY is not set.*LoadCredential="):
        cfg.path_of("supervisor.credential")
    result = run_runner("check-perms", env=env_for(home, None))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("runner: configuration error: supervisor.credential = ")
    assert "LoadCredential=supervisor.key:PATH" in lines[0]


def test_missing_credential_file_is_one_clear_line(home: Path, tmp_path: Path) -> None:
    empty = make_dir(tmp_path / "empty", 0o500)
    result = run_runner("check-perms", env=env_for(home, empty))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"runner: configuration error: supervisor.credential: systemd credential "
        f"'supervisor.key' is not in {empty} (add LoadCredential=supervisor.key:PATH to the unit)"
    ]
    # The supervisor itself stops with the same line, not with a traceback.
    sup = run_runner("supervisor", env=env_for(home, empty))
    assert sup.returncode == 2 and "Traceback" not in sup.stderr
    assert "is not in" in sup.stderr and len(sup.stderr.splitlines()) == 1, sup.stderr


@pytest.mark.parametrize("bad", ["systemd:", "systemd:../etc/shadow", "systemd:a/b", "systemd:.."])
def test_a_bad_credential_name_is_refused_at_load(home: Path, tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="is not a systemd credential name"):
        load_config(environ=env_for(home, tmp_path, bad))


def test_a_directory_option_cannot_be_a_credential(home: Path) -> None:
    env = clean_env(home, {"PRIVSEP__SERVER__SIGNING_KEYRING": "systemd:ring"})
    with pytest.raises(ConfigError, match="a systemd credential is one file"):
        load_config(environ=env)


@requires_root
def test_check_perms_accepts_what_systemd_delivers(home: Path, credentials: Path) -> None:
    result = run_runner("check-perms", env=env_for(home, credentials))
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 problems" in result.stdout
    assert str(credentials) not in result.stdout.split("not present yet")[-1]


@requires_root
@pytest.mark.parametrize("mode", [0o440, 0o404, 0o600 | 0o044])
def test_check_perms_rejects_a_looser_file(home: Path, credentials: Path, mode: int) -> None:
    key = credentials / "supervisor.key"
    key.chmod(mode)
    result = run_runner("check-perms", env=env_for(home, credentials))
    assert result.returncode == 1, result.stdout
    assert f"{key}: has mode {mode:04o}: group or others have access" in result.stdout


@requires_root
@pytest.mark.parametrize("mode", [0o550, 0o505, 0o555])
def test_check_perms_rejects_a_looser_directory(home: Path, credentials: Path, mode: int) -> None:
    credentials.chmod(mode)
    result = run_runner("check-perms", env=env_for(home, credentials))
    assert result.returncode == 1, result.stdout
    assert f"{credentials}: directory has mode {mode:04o}: others have access" in result.stdout
