"""Encryption at rest: round trips, key rotation, tampering, and the permission-checked key file.

Real keys, real files under ``tmp_path``; the only thing checked about error messages beyond
their type is that they never carry a key or a plaintext.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from privsep.secrets.fernet import (
    DecryptionError,
    FernetKeyError,
    FieldCipher,
    generate_fernet_key,
    load_fernet_keys,
)
from privsep.secrets.files import InsecureFileError

PLAINTEXT = "postgres://etl:correct horse battery staple@db/prod — ünïcødé"


def write(path: Path, data: str, mode: int) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    return path


def test_generated_keys_are_valid_and_distinct() -> None:
    keys = {generate_fernet_key() for _ in range(10)}
    assert len(keys) == 10
    for key in keys:
        assert len(base64.urlsafe_b64decode(key)) == 32
        Fernet(key)


def test_round_trip() -> None:
    cipher = FieldCipher([generate_fernet_key()])
    token = cipher.encrypt(PLAINTEXT)
    assert token.isascii()
    assert "correct horse" not in token
    assert cipher.decrypt(token) == PLAINTEXT
    # Fresh IV every time: equal plaintexts do not give equal ciphertexts.
    assert cipher.encrypt(PLAINTEXT) != token
    assert cipher.decrypt(cipher.encrypt("")) == ""


def test_rotation_first_key_encrypts_all_keys_decrypt() -> None:
    old, new = generate_fernet_key(), generate_fernet_key()
    stored = FieldCipher([old]).encrypt(PLAINTEXT)

    both = FieldCipher([new, old])
    assert both.decrypt(stored) == PLAINTEXT
    # New values are written under the new key only.
    assert FieldCipher([new]).decrypt(both.encrypt("fresh")) == "fresh"
    with pytest.raises(DecryptionError):
        FieldCipher([old]).decrypt(both.encrypt("fresh"))

    # rotate() re-encrypts an old value under the new key, after which the old key can go.
    rotated = both.rotate(stored)
    assert FieldCipher([new]).decrypt(rotated) == PLAINTEXT
    with pytest.raises(DecryptionError):
        FieldCipher([new]).decrypt(stored)


def test_tampering_is_detected_without_leaking() -> None:
    key = generate_fernet_key()
    cipher = FieldCipher([key])
    token = cipher.encrypt(PLAINTEXT)
    raw = bytearray(base64.urlsafe_b64decode(token))
    raw[-40] ^= 0x01  # a ciphertext byte, under the HMAC
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode()

    for bad in (tampered, token[:-8], token[:40], "", "not fernet", "ünïcødé"):
        with pytest.raises(DecryptionError) as excinfo:
            cipher.decrypt(bad)
        message = str(excinfo.value)
        assert key not in message
        assert "correct horse" not in message
        assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__
    with pytest.raises(DecryptionError):
        cipher.rotate(tampered)


def test_invalid_keys_are_refused_without_echoing_them() -> None:
    bad = "this-is-not-a-fernet-key"
    with pytest.raises(FernetKeyError, match="#2") as excinfo:
        FieldCipher([generate_fernet_key(), bad])
    assert bad not in str(excinfo.value)
    with pytest.raises(FernetKeyError, match="at least one"):
        FieldCipher([])
    with pytest.raises(TypeError, match="list of keys"):
        FieldCipher(generate_fernet_key())


def test_cipher_repr_hides_keys() -> None:
    key = generate_fernet_key()
    cipher = FieldCipher([key, generate_fernet_key()])
    assert repr(cipher) == "FieldCipher(keys=2, ***)"
    assert key not in repr(cipher)


def test_load_keys_from_a_private_file(tmp_path: Path) -> None:
    new, old = generate_fernet_key(), generate_fernet_key()
    path = write(tmp_path / "fernet.keys", f"# newest first\n{new}\n\n  {old}  \n", 0o600)
    keys = load_fernet_keys(path)
    assert keys == [new, old]
    cipher = FieldCipher(keys)
    assert cipher.decrypt(FieldCipher([old]).encrypt("old value")) == "old value"
    assert FieldCipher([new]).decrypt(cipher.encrypt("new value")) == "new value"


def test_load_keys_refuses_a_readable_file(tmp_path: Path) -> None:
    key = generate_fernet_key()
    path = write(tmp_path / "fernet.keys", key + "\n", 0o644)
    with pytest.raises(InsecureFileError) as excinfo:
        load_fernet_keys(path)
    assert "0644" in str(excinfo.value)
    assert key not in str(excinfo.value)


def test_load_keys_refuses_a_symlink(tmp_path: Path) -> None:
    real = write(tmp_path / "real.keys", generate_fernet_key() + "\n", 0o600)
    link = tmp_path / "fernet.keys"
    link.symlink_to(real)
    with pytest.raises(InsecureFileError, match="symbolic link"):
        load_fernet_keys(link)


def test_load_keys_reports_the_bad_line(tmp_path: Path) -> None:
    path = write(tmp_path / "fernet.keys", f"{generate_fernet_key()}\nsecret-but-wrong\n", 0o600)
    with pytest.raises(FernetKeyError, match=r"fernet\.keys:2: not a Fernet key") as excinfo:
        load_fernet_keys(path)
    assert "secret-but-wrong" not in str(excinfo.value)


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"])
def test_load_keys_refuses_an_empty_file(tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "fernet.keys", content, 0o600)
    with pytest.raises(FernetKeyError, match="holds no key"):
        load_fernet_keys(path)
