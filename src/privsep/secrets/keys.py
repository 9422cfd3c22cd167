"""Ed25519 keys: the supervisor credential and, later, the server's signing key ring.

Private keys are loaded only through :func:`privsep.secrets.files.read_secret_file`, so a key
that fails the permission check is never parsed, let alone used.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privsep.secrets.files import read_secret_file


class KeyFormatError(Exception):
    """The file passed the permission check but does not hold an Ed25519 private key."""


def generate_ed25519_pem() -> tuple[bytes, bytes]:
    """A new key pair as (PKCS#8 private PEM, SubjectPublicKeyInfo public PEM)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def load_private_key(path: str) -> Ed25519PrivateKey:
    """Load the long-lived credential from a permission-checked PEM file."""
    data = read_secret_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFormatError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(f"{path}: holds a {type(key).__name__}, not an Ed25519 key")
    return key
