"""The server's token-signing key ring: Ed25519 keys in one private directory.

Why a ring and not one key: a signing key must be replaceable without invalidating every token
in flight. :func:`rotate` adds a key that signs from then on, while the older keys keep
verifying; :func:`prune` drops an old key only once its successor has been signing for longer
than the longest token lifetime, so no live token loses its verifier.

Layout of the directory (mode 0700, checked with
:func:`~privsep.secrets.files.check_secret_dir` before anything in it is read or written)::

    ring.json        {"version": 1, "id": ..., "removed": [<kid>, ...],
                      "keys": [{"kid": ..., "created": <unix seconds>}, ...]}
    <kid>.key        PKCS#8 PEM Ed25519 private key, 0600
    <kid>.pub        SubjectPublicKeyInfo PEM public key, 0600

``ring.json`` is the source of truth: it lists the keys in creation order, and the **last**
entry is the current signer. Key files that it does not list are ignored. It is rewritten
atomically (a new 0600 file, then ``rename``), and a key's files are written before the index
names them and unlinked only after the index has dropped them, so a reader never sees an index
entry without its files. Writers (create, rotate, prune) hold an exclusive ``flock`` on the
directory and readers a shared one, so two ``runner keys rotate`` at once cannot lose a key.

The ring's ``id`` names the ring, not a key: it is random, public, and stays when keys come and
go. The server answers ``/v1/health`` with it, so ``runner standalone`` can tell its own server
from another one on the same port. A ring written before ids existed has none in its index;
the kid of its oldest key stands in, and the next write (rotate, prune, remove) stores that
value, so the id does not change when that key is pruned.

``removed`` lists the kids that :func:`prune` and :func:`remove_key` took out of the ring.
The server's copy of a public key (published in its database for other replicas) would
otherwise outlive the key: the server retires every kid listed there. It is an explicit record,
not an inference from "published but not in my ring", so a replica whose copy of the ring is
older than another's never mistakes a newer key for a removed one.

A ``kid`` is the first 16 characters of base64url(sha256(raw 32-byte public key)): it is
derived from the key, so every replica computes the same one, and a key file that does not
match its name is refused rather than trusted.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from privsep.secrets.files import (
    InsecureFileError,
    check_secret_dir,
    make_private_dir,
    read_secret_file,
    write_private_file,
)

__all__ = [
    "KeyRingError",
    "LoadedRing",
    "RingEntry",
    "SigningKey",
    "create_keyring",
    "key_id",
    "list_keys",
    "load_ring",
    "load_signer",
    "load_verifiers",
    "prune",
    "public_jwks",
    "remove_key",
    "ring_id",
    "rotate",
    "verifiers_from_jwks",
]

RING_FILE = "ring.json"
RING_VERSION = 1
KID_LENGTH = 16
# A kid names files in the ring directory: accept only what key_id() can produce, so a tampered
# index or JWKS cannot smuggle in "../" or an absolute path.
_KID_RE = re.compile(r"[A-Za-z0-9_-]{16}")
_RING_ID_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")

PathArg = str | os.PathLike[str]


class KeyRingError(Exception):
    """The key ring is missing, malformed or inconsistent (permissions aside).

    Permission problems raise :class:`~privsep.secrets.files.InsecureFileError` instead, so the
    caller can print the findings and their fixes.
    """


@dataclass(frozen=True)
class SigningKey:
    """The current signer: its kid (goes into every token header) and its private key."""

    kid: str
    private_key: Ed25519PrivateKey = field(repr=False)

    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


@dataclass(frozen=True)
class RingEntry:
    """One key as the index records it: its id and when it was added (unix seconds)."""

    kid: str
    created: float


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """The deterministic kid of a public key: base64url(sha256(raw key))[:16]."""
    return _b64url(hashlib.sha256(_raw_public(public_key)).digest())[:KID_LENGTH]


def _require_secure_dir(directory: str) -> None:
    findings = check_secret_dir(directory)
    if findings:
        raise InsecureFileError(findings)


@contextmanager
def _locked(directory: str, *, exclusive: bool) -> Iterator[int]:
    """Hold a ``flock`` on the ring directory itself; yields the directory's descriptor."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


@dataclass(frozen=True)
class _Index:
    """``ring.json`` as read: the ring's id and its keys, oldest first."""

    ring_id: str
    entries: list[RingEntry]
    removed: tuple[str, ...] = ()


def _parse_ring(path: str, data: bytes) -> _Index:
    def bad(why: str) -> KeyRingError:
        return KeyRingError(f"{path}: {why}")

    try:
        doc: Any = json.loads(data)
    except (ValueError, RecursionError):
        raise bad("not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != RING_VERSION:
        raise bad(f"not a version {RING_VERSION} key ring index")
    keys = doc.get("keys")
    if not isinstance(keys, list) or not keys:
        raise bad("lists no keys")
    entries: list[RingEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(keys):
        if not isinstance(item, dict):
            raise bad(f"entry {i} is not an object")
        kid, created = item.get("kid"), item.get("created")
        if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
            raise bad(f"entry {i} has an invalid kid")
        if isinstance(created, bool) or not isinstance(created, int | float):
            raise bad(f"entry {i} ({kid}) has no numeric 'created'")
        if kid in seen:
            raise bad(f"kid {kid} is listed twice")
        seen.add(kid)
        entries.append(RingEntry(kid, float(created)))
    ring = doc.get("id", entries[0].kid)
    if not isinstance(ring, str) or not _RING_ID_RE.fullmatch(ring):
        raise bad("has an invalid 'id'")
    removed = doc.get("removed", [])
    if not isinstance(removed, list) or not all(
        isinstance(k, str) and _KID_RE.fullmatch(k) for k in removed
    ):
        raise bad("has an invalid 'removed' list")
    return _Index(ring, entries, tuple(removed))


def _read_ring(directory: str) -> list[RingEntry]:
    return _read_index(directory).entries


def _read_index(directory: str) -> _Index:
    path = os.path.join(directory, RING_FILE)
    try:
        data = read_secret_file(path)
    except FileNotFoundError:
        raise KeyRingError(
            f"{directory}: not a key ring (no {RING_FILE}); create one with create_keyring()"
        ) from None
    return _parse_ring(path, data)


def _write_ring(
    directory: str,
    dir_fd: int,
    ring: str,
    entries: list[RingEntry],
    removed: tuple[str, ...] = (),
) -> None:
    """Replace ``ring.json`` atomically: write a fresh 0600 file, fsync, rename, fsync the dir."""
    doc = {
        "version": RING_VERSION,
        "id": ring,
        "removed": list(removed),
        "keys": [{"kid": e.kid, "created": e.created} for e in entries],
    }
    data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    tmp = os.path.join(directory, f".{RING_FILE}.{os.urandom(8).hex()}.tmp")
    write_private_file(tmp, data)
    try:
        os.replace(tmp, os.path.join(directory, RING_FILE))
    except BaseException:
        os.unlink(tmp)
        raise
    os.fsync(dir_fd)


def _add_key(directory: str) -> str:
    """Generate a key and write its two files; the caller then adds it to the index.

    A kid that begins with ``-`` reads as an option on a command line (``runner keys retire
    -x…``), so such a key is thrown away and another drawn: one draw in 64, and the kid stays
    the plain digest of the key, so rings written before this rule still verify.
    """
    key = Ed25519PrivateKey.generate()
    kid = key_id(key.public_key())
    while kid.startswith("-"):
        key = Ed25519PrivateKey.generate()
        kid = key_id(key.public_key())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_private_file(os.path.join(directory, f"{kid}.key"), private)
    write_private_file(os.path.join(directory, f"{kid}.pub"), public)
    return kid


def create_keyring(directory: PathArg, *, now: float | None = None) -> str:
    """Create a key ring with its first key and return that key's kid.

    The directory is created at 0700 when missing; an existing one must already pass the
    permission check. An existing ring is never overwritten (that would orphan every token it
    signed): use :func:`rotate` instead.
    """
    d = os.fspath(directory)
    make_private_dir(d)
    _require_secure_dir(d)
    with _locked(d, exclusive=True) as dir_fd:
        if os.path.lexists(os.path.join(d, RING_FILE)):
            raise KeyRingError(f"{d}: already a key ring; use rotate() to add a key")
        kid = _add_key(d)
        ring = _b64url(os.urandom(12))
        _write_ring(d, dir_fd, ring, [RingEntry(kid, time.time() if now is None else now)])
    return kid


def rotate(directory: PathArg, *, now: float | None = None) -> str:
    """Add a new key that becomes the signer at once; return its kid.

    Old keys stay in the ring and keep verifying until :func:`prune` drops them. Replicas that
    verify from their own copy of the public keys must reload them (see :func:`public_jwks`)
    before they see tokens signed with the new kid.
    """
    d = os.fspath(directory)
    _require_secure_dir(d)
    with _locked(d, exclusive=True) as dir_fd:
        index = _read_index(d)
        kid = _add_key(d)
        created = time.time() if now is None else now
        entries = [*index.entries, RingEntry(kid, created)]
        _write_ring(d, dir_fd, index.ring_id, entries, index.removed)
    return kid


def prune(directory: PathArg, keep_seconds: float, *, now: float | None = None) -> list[str]:
    """Remove keys whose successor was created more than ``keep_seconds`` ago; return their kids.

    A key stops signing when its successor is created, so a token it signed lives at most the
    token lifetime after that. Pass ``keep_seconds`` at least the longest token lifetime (plus
    clock leeway) and no live token loses its verifier. The current signer is never removed.
    """
    if keep_seconds < 0:
        raise ValueError("keep_seconds must not be negative")
    d = os.fspath(directory)
    _require_secure_dir(d)
    t = time.time() if now is None else now
    with _locked(d, exclusive=True) as dir_fd:
        index = _read_index(d)
        drop = {
            entry.kid
            for entry, successor in itertools.pairwise(index.entries)
            if t - successor.created > keep_seconds
        }
        _drop_keys(d, dir_fd, index, drop)
    return [e.kid for e in index.entries if e.kid in drop]


def remove_key(directory: PathArg, kid: str) -> bool:
    """Remove one key that no longer signs, private half included; False if the ring lacks it.

    Unlike :func:`prune` this keeps no overlap: it is how a retired (say, leaked) key leaves
    the host. The current signer is refused: rotate first, so something still signs.
    """
    d = os.fspath(directory)
    _require_secure_dir(d)
    with _locked(d, exclusive=True) as dir_fd:
        index = _read_index(d)
        if kid == index.entries[-1].kid:
            raise KeyRingError(f"{d}: {kid} is the current signing key; rotate first")
        if kid not in {e.kid for e in index.entries}:
            return False
        _drop_keys(d, dir_fd, index, {kid})
    return True


def _drop_keys(d: str, dir_fd: int, index: _Index, drop: set[str]) -> None:
    """Rewrite the index without ``drop``, then unlink their files (the caller holds the lock
    and never drops the last entry, the signer)."""
    if not drop:
        return
    kept = [e for e in index.entries if e.kid not in drop]
    _write_ring(d, dir_fd, index.ring_id, kept, (*index.removed, *sorted(drop)))
    # Only now that no index names them: a reader never meets a listed key without files.
    for kid in sorted(drop):
        for suffix in (".key", ".pub"):
            with suppress(FileNotFoundError):
                os.unlink(os.path.join(d, kid + suffix))
    os.fsync(dir_fd)


def ring_id(directory: PathArg) -> str:
    """The ring's public id (see the module's docstring): stable across rotations."""
    d = os.fspath(directory)
    _require_secure_dir(d)
    with _locked(d, exclusive=False):
        return _read_index(d).ring_id


def list_keys(directory: PathArg) -> list[RingEntry]:
    """The ring's keys in creation order; the last one is the current signer."""
    d = os.fspath(directory)
    _require_secure_dir(d)
    with _locked(d, exclusive=False):
        return _read_ring(d)


def _load_private(path: str, kid: str) -> Ed25519PrivateKey:
    data = read_secret_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyRingError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyRingError(f"{path}: holds a {type(key).__name__}, not an Ed25519 key")
    if key_id(key.public_key()) != kid:
        raise KeyRingError(f"{path}: the key in this file does not have kid {kid}")
    return key


def _load_public(path: str, kid: str) -> Ed25519PublicKey:
    data = read_secret_file(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyRingError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyRingError(f"{path}: holds a {type(key).__name__}, not an Ed25519 key")
    if key_id(key) != kid:
        raise KeyRingError(f"{path}: the key in this file does not have kid {kid}")
    return key


def load_signer(directory: PathArg) -> SigningKey:
    """The current signer, read only through the permission check.

    Raises :class:`InsecureFileError` if the directory, the index or the key file is readable
    or writable by anyone else, and :class:`KeyRingError` if the key is not the one its kid
    names.
    """
    d = os.fspath(directory)
    _require_secure_dir(d)
    with _locked(d, exclusive=False):
        kid = _read_ring(d)[-1].kid
        return SigningKey(kid, _load_private(os.path.join(d, f"{kid}.key"), kid))


@dataclass(frozen=True)
class LoadedRing:
    """One consistent look at the ring: its id, its signer, every key it holds (as public
    keys, the signer's included) and the kids it removed."""

    ring_id: str
    signer: SigningKey
    verifiers: dict[str, Ed25519PublicKey]
    removed: frozenset[str]


def load_ring(directory: PathArg) -> LoadedRing:
    """:func:`load_signer`, :func:`load_verifiers` and the removal record, under one lock, so
    a rotation in between cannot make them disagree."""
    d = os.fspath(directory)
    _require_secure_dir(d)
    with _locked(d, exclusive=False):
        index = _read_index(d)
        kid = index.entries[-1].kid
        signer = SigningKey(kid, _load_private(os.path.join(d, f"{kid}.key"), kid))
        verifiers = {
            e.kid: _load_public(os.path.join(d, f"{e.kid}.pub"), e.kid) for e in index.entries
        }
        return LoadedRing(index.ring_id, signer, verifiers, frozenset(index.removed))


def load_verifiers(directory: PathArg) -> dict[str, Ed25519PublicKey]:
    """Every key in the ring as ``{kid: public key}``, ready for ``verify_token``.

    Call it at start-up and after a rotation, not per request: the values are key objects,
    so verifying a token parses no PEM.
    """
    d = os.fspath(directory)
    _require_secure_dir(d)
    with _locked(d, exclusive=False):
        return {e.kid: _load_public(os.path.join(d, f"{e.kid}.pub"), e.kid) for e in _read_ring(d)}


def public_jwks(directory: PathArg) -> dict[str, Any]:
    """The ring's public keys as a JWKS (RFC 8037 OKP/Ed25519), for other replicas to verify.

    Keys are listed newest first, so the current signer comes first.
    """
    return jwks_of(dict(reversed(load_verifiers(directory).items())))


def jwks_of(verifiers: Mapping[str, Ed25519PublicKey]) -> dict[str, Any]:
    """A JWKS of already-loaded public keys, in the order given."""
    return {
        "keys": [
            {
                "kty": "OKP",
                "crv": "Ed25519",
                "x": _b64url(_raw_public(key)),
                "kid": kid,
                "alg": "EdDSA",
                "use": "sig",
            }
            for kid, key in verifiers.items()
        ]
    }


def _b64url_decode(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def verifiers_from_jwks(jwks: Any) -> dict[str, Ed25519PublicKey]:
    """Turn a JWKS published by :func:`public_jwks` back into ``{kid: public key}``.

    Every key must be OKP/Ed25519 and its kid must be the thumbprint of its key, so a JWKS
    cannot bind a known kid to a key of the publisher's choosing.
    """
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise KeyRingError("JWKS: not an object with a 'keys' list")
    result: dict[str, Ed25519PublicKey] = {}
    for i, jwk in enumerate(jwks["keys"]):
        if not isinstance(jwk, dict):
            raise KeyRingError(f"JWKS: key {i} is not an object")
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            raise KeyRingError(f"JWKS: key {i} is not an OKP/Ed25519 key")
        if jwk.get("alg", "EdDSA") != "EdDSA" or jwk.get("use", "sig") != "sig":
            raise KeyRingError(f"JWKS: key {i} is not an EdDSA signing key")
        kid, x = jwk.get("kid"), jwk.get("x")
        if not isinstance(kid, str) or not _KID_RE.fullmatch(kid) or not isinstance(x, str):
            raise KeyRingError(f"JWKS: key {i} has no valid 'kid' and 'x'")
        try:
            key = Ed25519PublicKey.from_public_bytes(_b64url_decode(x))
        except ValueError:
            raise KeyRingError(f"JWKS: key {i} ({kid}) is not a valid Ed25519 key") from None
        if key_id(key) != kid:
            raise KeyRingError(f"JWKS: key {i}: kid {kid} is not the thumbprint of its key")
        result[kid] = key
    return result
