"""``runner credentials create --out PATH`` through the real CLI, on real files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from helpers import clean_env, make_dir, mode_of, run_runner, write_file
from privsep.secrets.keys import load_private_key

PEM_PUBLIC_BEGIN = "-----BEGIN PUBLIC KEY-----\n"
PEM_PUBLIC_END = "-----END PUBLIC KEY-----\n"


def create(out: Path, *, umask: int = -1, home: Path | None = None):
    result = run_runner("credentials", "create", "--out", out, env=clean_env(home), umask=umask)
    assert "Traceback" not in result.stderr, result.stderr
    assert "PRIVATE KEY" not in result.stdout
    assert "PRIVATE KEY" not in result.stderr
    return result


def raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def digest(path: Path) -> tuple[bytes, int, int]:
    st = os.lstat(path)
    return hashlib.sha256(path.read_bytes()).digest(), st.st_mode, st.st_ino


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_creates_a_private_key_and_prints_the_public_key(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "new" / "deeper" / "supervisor.key"
    result = create(out, umask=umask)
    assert result.returncode == 0, result.stderr

    # The private key: mode 0600, in new 0700 directories, whatever the umask.
    assert mode_of(out) == 0o600
    assert mode_of(tmp_path / "new") == 0o700
    assert mode_of(tmp_path / "new" / "deeper") == 0o700
    private_pem = out.read_bytes()
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")

    # stdout is exactly one PEM public key, the same as PATH.pub.
    assert result.stdout.startswith(PEM_PUBLIC_BEGIN)
    assert result.stdout.endswith(PEM_PUBLIC_END)
    assert result.stdout.count("-----BEGIN") == 1
    assert Path(f"{out}.pub").read_text() == result.stdout
    assert not mode_of(f"{out}.pub") & 0o022  # public, but nobody else may rewrite it

    # The printed public key belongs to the private key that was written.
    private = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(private, Ed25519PrivateKey)
    public = serialization.load_pem_public_key(result.stdout.encode())
    assert isinstance(public, Ed25519PublicKey)
    assert raw(public) == raw(private.public_key())
    message = b"prove it"
    public.verify(private.sign(message), message)

    # stderr says where the files went.
    assert str(out) in result.stderr
    assert "mode 0600" in result.stderr


def test_created_key_passes_the_permission_checked_loader(tmp_path: Path) -> None:
    out = tmp_path / "creds" / "supervisor.key"
    result = create(out)
    assert result.returncode == 0, result.stderr
    key = load_private_key(str(out))
    assert raw(key.public_key()) == raw(serialization.load_pem_public_key(result.stdout.encode()))


def test_each_run_makes_a_new_key(tmp_path: Path) -> None:
    first = create(tmp_path / "a.key")
    second = create(tmp_path / "b.key")
    assert first.returncode == second.returncode == 0
    assert first.stdout != second.stdout


def test_relative_out_is_resolved_against_the_working_directory(tmp_path: Path) -> None:
    work = make_dir(tmp_path / "work", 0o700)
    result = run_runner(
        "credentials", "create", "--out", "sub/supervisor.key", env=clean_env(), cwd=work
    )
    assert result.returncode == 0, result.stderr
    assert mode_of(work / "sub" / "supervisor.key") == 0o600
    assert (work / "sub" / "supervisor.key.pub").is_file()


def test_refuses_to_overwrite_an_existing_credential(tmp_path: Path) -> None:
    out = tmp_path / "creds" / "supervisor.key"
    assert create(out).returncode == 0
    before = digest(out), digest(Path(f"{out}.pub"))

    again = create(out)
    assert again.returncode == 1
    assert again.stdout == ""
    assert again.stderr.startswith(f"runner: {out} already exists"), again.stderr
    assert (digest(out), digest(Path(f"{out}.pub"))) == before  # byte-identical, same inode


def test_refuses_when_only_the_public_half_exists(tmp_path: Path) -> None:
    out = tmp_path / "supervisor.key"
    pub = write_file(f"{out}.pub", b"someone else's public key\n", mode=0o644)
    result = create(out)
    assert result.returncode == 1
    assert f"{pub} already exists" in result.stderr
    assert not os.path.lexists(out)
    assert pub.read_bytes() == b"someone else's public key\n"


def test_refuses_a_planted_symlink_to_an_existing_file(tmp_path: Path) -> None:
    victim = write_file(tmp_path / "victim", b"do not touch\n", mode=0o644)
    before = digest(victim)
    out = make_dir(tmp_path / "creds", 0o700) / "supervisor.key"
    out.symlink_to(victim)

    result = create(out)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{out} already exists" in result.stderr
    assert digest(victim) == before
    assert out.is_symlink() and os.readlink(out) == str(victim)
    assert not os.path.lexists(f"{out}.pub")


def test_refuses_a_planted_dangling_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "would-be-created"
    out = make_dir(tmp_path / "creds", 0o700) / "supervisor.key"
    out.symlink_to(victim)

    result = create(out)
    assert result.returncode == 1
    assert "already exists" in result.stderr
    assert not os.path.lexists(victim)


def test_parent_that_is_a_file_is_a_clean_error(tmp_path: Path) -> None:
    blocker = write_file(tmp_path / "not-a-dir", b"x")
    out = blocker / "supervisor.key"
    result = create(out)
    assert result.returncode == 1
    assert result.stderr.startswith(f"runner: cannot write {out}"), result.stderr
    assert "is the parent a file?" in result.stderr
    assert blocker.read_bytes() == b"x"


def test_out_is_required() -> None:
    result = run_runner("credentials", "create", env=clean_env())
    assert result.returncode == 2
    assert "--out" in result.stderr
