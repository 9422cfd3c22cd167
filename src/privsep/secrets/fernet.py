"""Encryption at rest for stored secrets (connection passwords and the like).

Why Fernet: it is authenticated (AES-128-CBC + HMAC-SHA256), so a tampered or truncated
column fails loudly instead of decrypting to garbage, and ``MultiFernet`` gives key rotation
for free: the first key encrypts, every key decrypts, and :meth:`FieldCipher.rotate`
re-encrypts old values under the first key.

The keys live in a permission-checked file, one urlsafe-base64 key per line, newest first::

    # lines starting with '#' and blank lines are ignored
    <new key>
    <old key, still decrypts until every value is rotated>

No error message from this module contains a key or a plaintext.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from privsep.secrets.files import read_secret_file

__all__ = [
    "DecryptionError",
    "FernetKeyError",
    "FieldCipher",
    "generate_fernet_key",
    "load_fernet_keys",
]


class DecryptionError(Exception):
    """A stored value could not be decrypted: tampered, truncated, or under an unknown key."""


@contextmanager
def _undecryptable(message: str) -> Iterator[None]:
    """Turn every way a stored value can fail to open (a wrong key, a tampered or non-ASCII
    value, a non-string) into one :class:`DecryptionError` whose ``message`` names no secret."""
    try:
        yield
    except (InvalidToken, UnicodeError, TypeError, AttributeError):
        raise DecryptionError(message) from None


class FernetKeyError(ValueError):
    """A Fernet key (or the key file) is not valid. The message never includes the key."""


def generate_fernet_key() -> str:
    """A new random key, as the text that goes on one line of the key file."""
    return Fernet.generate_key().decode("ascii")


class FieldCipher:
    """Encrypts and decrypts single text fields; the first key encrypts, all keys decrypt."""

    __slots__ = ("_count", "_fernet")

    def __init__(self, keys: Sequence[str]) -> None:
        if isinstance(keys, str):
            raise TypeError("keys must be a list of keys, not one string")
        if not keys:
            raise FernetKeyError("at least one Fernet key is required")
        fernets: list[Fernet] = []
        for i, key in enumerate(keys, 1):
            try:
                fernets.append(Fernet(key))
            except (ValueError, TypeError):
                raise FernetKeyError(
                    f"Fernet key #{i} is not 32 url-safe base64-encoded bytes"
                ) from None
        self._fernet = MultiFernet(fernets)
        self._count = len(fernets)

    def encrypt(self, plaintext: str) -> str:
        """Encrypt under the first key; the result is ASCII, safe for a text column."""
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, ciphertext: str) -> str:
        """Decrypt with whichever key fits, or raise :class:`DecryptionError`."""
        with _undecryptable(
            "stored value cannot be decrypted: it was altered, or encrypted under a key "
            "that is no longer in the key file"
        ):
            return self._fernet.decrypt(ciphertext.encode("ascii")).decode("utf-8")

    def rotate(self, ciphertext: str) -> str:
        """Re-encrypt a stored value under the first key (after adding a new key)."""
        with _undecryptable(
            "stored value cannot be re-encrypted: it does not decrypt with any known key"
        ):
            return self._fernet.rotate(ciphertext.encode("ascii")).decode("ascii")

    def __repr__(self) -> str:
        return f"FieldCipher(keys={self._count}, ***)"

    def __reduce__(self) -> str:
        raise TypeError("a FieldCipher holds keys and is not picklable")


def load_fernet_keys(path: str | os.PathLike[str]) -> list[str]:
    """Read the key file (permission-checked, like every secret) and return its keys in order.

    Each key is validated here, so a bad line is reported with its line number at start-up
    rather than as a decryption failure later.
    """
    p = os.fspath(path)
    data = read_secret_file(p)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise FernetKeyError(f"{p}: not an ASCII key file") from None
    keys: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise FernetKeyError(
                f"{p}:{lineno}: not a Fernet key (32 url-safe base64-encoded bytes)"
            ) from None
        keys.append(key)
    if not keys:
        raise FernetKeyError(f"{p}: holds no key")
    return keys
