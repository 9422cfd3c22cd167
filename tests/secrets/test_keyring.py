"""The signing key ring on real files: layout, modes, rotation, pruning, JWKS, refusals.

Everything runs on real directories under ``tmp_path`` (root-owned 0700 parents, so the
parent-directory rule passes unless a test breaks it on purpose). Time is passed in with
``now=`` instead of sleeping.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privsep.secrets.files import InsecureFileError
from privsep.secrets.keyring import (
    KeyRingError,
    create_keyring,
    key_id,
    list_keys,
    load_ring,
    load_signer,
    load_verifiers,
    prune,
    public_jwks,
    remove_key,
    ring_id,
    rotate,
    verifiers_from_jwks,
)

T0 = 1_700_000_000.0


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@pytest.fixture
def ring(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    create_keyring(d, now=T0)
    return d


def test_create_lays_out_private_files(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    kid = create_keyring(d, now=T0)

    assert mode_of(d) == 0o700
    assert sorted(p.name for p in d.iterdir()) == sorted([f"{kid}.key", f"{kid}.pub", "ring.json"])
    for p in d.iterdir():
        assert mode_of(p) == 0o600, p
    assert json.loads((d / "ring.json").read_text()) == {
        "version": 1,
        "id": ring_id(d),
        "removed": [],
        "keys": [{"kid": kid, "created": T0}],
    }
    assert (d / f"{kid}.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_kid_is_the_truncated_sha256_thumbprint(ring: Path) -> None:
    signer = load_signer(ring)
    digest = hashlib.sha256(raw(signer.public_key())).digest()
    expected = base64.urlsafe_b64encode(digest).decode()[:16]
    assert signer.kid == expected == key_id(signer.public_key())
    # Deterministic: the same key always gets the same kid.
    assert key_id(load_verifiers(ring)[signer.kid]) == expected


def test_create_refuses_to_overwrite_a_ring(ring: Path) -> None:
    before = (ring / "ring.json").read_bytes()
    with pytest.raises(KeyRingError, match="already a key ring"):
        create_keyring(ring)
    assert (ring / "ring.json").read_bytes() == before
    assert len(list(ring.glob("*.key"))) == 1


def test_rotate_adds_a_signer_and_keeps_old_verifiers(ring: Path) -> None:
    first = load_signer(ring).kid
    second = rotate(ring, now=T0 + 100)

    assert second != first
    assert load_signer(ring).kid == second
    assert set(load_verifiers(ring)) == {first, second}
    assert [(e.kid, e.created) for e in list_keys(ring)] == [(first, T0), (second, T0 + 100)]
    assert mode_of(ring / f"{second}.key") == 0o600


def test_prune_waits_for_the_window_then_drops_old_keys(ring: Path) -> None:
    first = load_signer(ring).kid
    second = rotate(ring, now=T0 + 1000)
    third = rotate(ring, now=T0 + 2000)

    # The successor of `first` was created 500 s ago: inside a 600 s window, keep everything.
    assert prune(ring, 600, now=T0 + 1500) == []
    assert set(load_verifiers(ring)) == {first, second, third}

    # 601 s after `second` appeared, `first` goes; `second` stays (its successor is 1 s old).
    assert prune(ring, 600, now=T0 + 1601) == [first]
    assert set(load_verifiers(ring)) == {second, third}
    assert not (ring / f"{first}.key").exists()
    assert not (ring / f"{first}.pub").exists()

    assert prune(ring, 600, now=T0 + 2601) == [second]
    assert [e.kid for e in list_keys(ring)] == [third]
    assert load_ring(ring).removed == {first, second}


def test_prune_never_removes_the_current_signer(ring: Path) -> None:
    only = load_signer(ring).kid
    assert prune(ring, 0, now=T0 + 10**9) == []
    assert load_signer(ring).kid == only


def test_ring_id_is_random_per_ring_and_survives_rotation_and_pruning(
    ring: Path, tmp_path: Path
) -> None:
    first = ring_id(ring)
    create_keyring(tmp_path / "other", now=T0)
    assert ring_id(tmp_path / "other") != first
    rotate(ring, now=T0 + 10)
    rotate(ring, now=T0 + 20)
    assert prune(ring, 0, now=T0 + 30)
    assert ring_id(ring) == first


def test_a_ring_without_id_keeps_its_oldest_kid_as_id_through_pruning(ring: Path) -> None:
    index = ring / "ring.json"
    doc = json.loads(index.read_text())
    del doc["id"]
    index.write_text(json.dumps(doc))
    oldest = doc["keys"][0]["kid"]
    assert ring_id(ring) == oldest
    rotate(ring, now=T0 + 10)  # a write stores the stand-in, so pruning the key keeps it
    assert prune(ring, 0, now=T0 + 20) == [oldest]
    assert ring_id(ring) == oldest


def test_remove_key_deletes_an_old_key_and_refuses_the_signer(ring: Path) -> None:
    old = load_signer(ring).kid
    new = rotate(ring, now=T0 + 10)
    with pytest.raises(KeyRingError, match="current signing key; rotate first"):
        remove_key(ring, new)
    assert remove_key(ring, old) is True
    assert not (ring / f"{old}.key").exists() and not (ring / f"{old}.pub").exists()
    assert set(load_verifiers(ring)) == {new}
    # The removal is recorded, so the server retires the key's published copy too.
    assert load_ring(ring).removed == {old}
    assert set(load_ring(ring).verifiers) == {new} and load_ring(ring).signer.kid == new
    assert remove_key(ring, old) is False


def test_prune_rejects_a_negative_window(ring: Path) -> None:
    with pytest.raises(ValueError, match="negative"):
        prune(ring, -1)


def test_concurrent_rotations_lose_no_key(ring: Path) -> None:
    kids: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            kids.append(rotate(ring))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    listed = [e.kid for e in list_keys(ring)]
    assert len(listed) == 9
    assert set(kids) <= set(listed)
    assert set(load_verifiers(ring)) == set(listed)
    assert not list(ring.glob(".ring.json.*"))  # no temporary index left behind


def test_public_jwks_round_trips(ring: Path) -> None:
    old = load_signer(ring).kid
    new = rotate(ring)
    jwks = public_jwks(ring)

    assert [k["kid"] for k in jwks["keys"]] == [new, old]  # current signer first
    for jwk in jwks["keys"]:
        assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}
        assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == (
            "OKP",
            "Ed25519",
            "EdDSA",
            "sig",
        )
        assert "d" not in jwk
    # It survives JSON, and what comes back are the very same public keys.
    back = verifiers_from_jwks(json.loads(json.dumps(jwks)))
    ours = load_verifiers(ring)
    assert {kid: raw(k) for kid, k in back.items()} == {kid: raw(k) for kid, k in ours.items()}


def test_jwks_cannot_bind_a_kid_to_another_key(ring: Path) -> None:
    jwks = public_jwks(ring)
    intruder = Ed25519PrivateKey.generate().public_key()
    jwks["keys"][0]["x"] = base64.urlsafe_b64encode(raw(intruder)).decode().rstrip("=")
    with pytest.raises(KeyRingError, match="not the thumbprint"):
        verifiers_from_jwks(jwks)


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "RSA", "kid": "A" * 16, "n": "x", "e": "AQAB"},
        {"kty": "OKP", "crv": "Ed448", "kid": "A" * 16, "x": "AA"},
        {"kty": "OKP", "crv": "Ed25519", "kid": "../../etc/passw", "x": "AA"},
        {"kty": "OKP", "crv": "Ed25519", "kid": "A" * 16, "x": "AAAA"},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "A" * 16},
    ],
)
def test_jwks_with_foreign_keys_is_refused(jwk: dict[str, str]) -> None:
    with pytest.raises(KeyRingError):
        verifiers_from_jwks({"keys": [jwk]})


def test_load_signer_refuses_a_group_readable_key_file(ring: Path) -> None:
    kid = load_signer(ring).kid
    os.chmod(ring / f"{kid}.key", 0o644)
    with pytest.raises(InsecureFileError) as excinfo:
        load_signer(ring)
    finding = excinfo.value.findings[0]
    assert finding.path == str(ring / f"{kid}.key")
    assert "0644" in finding.problem
    assert finding.fix.startswith("chmod 600 ")


def test_load_signer_refuses_a_0755_ring_directory(ring: Path) -> None:
    os.chmod(ring, 0o755)
    with pytest.raises(InsecureFileError) as excinfo:
        load_signer(ring)
    assert excinfo.value.findings[0].path == str(ring)
    assert "0755" in excinfo.value.findings[0].problem
    # Every entry point checks the directory, not just the signer.
    for call in (load_verifiers, public_jwks, rotate, list_keys):
        with pytest.raises(InsecureFileError):
            call(ring)
    with pytest.raises(InsecureFileError):
        prune(ring, 0)


def test_create_refuses_an_existing_loose_directory(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    d.mkdir()
    os.chmod(d, 0o755)
    with pytest.raises(InsecureFileError):
        create_keyring(d)
    assert list(d.iterdir()) == []


def test_symlinked_key_file_is_refused(ring: Path, tmp_path: Path) -> None:
    kid = load_signer(ring).kid
    real = tmp_path / "elsewhere.key"
    os.rename(ring / f"{kid}.key", real)
    os.symlink(real, ring / f"{kid}.key")
    with pytest.raises(InsecureFileError, match="symbolic link"):
        load_signer(ring)


def test_a_key_that_does_not_match_its_kid_is_refused(ring: Path) -> None:
    kid = load_signer(ring).kid
    other = Ed25519PrivateKey.generate()
    pem = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (ring / f"{kid}.key").write_bytes(pem)  # keeps mode 0600: only the content is wrong
    with pytest.raises(KeyRingError, match=f"does not have kid {kid}"):
        load_signer(ring)


def test_a_swapped_public_key_is_refused(ring: Path) -> None:
    kid = load_signer(ring).kid
    other = Ed25519PrivateKey.generate().public_key()
    (ring / f"{kid}.pub").write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyRingError, match=f"does not have kid {kid}"):
        load_verifiers(ring)


@pytest.mark.parametrize(
    "index",
    [
        "not json",
        '{"version": 2, "keys": []}',
        '{"version": 1, "keys": []}',
        '{"version": 1, "keys": [{"kid": "../../../etc/pwd", "created": 1}]}',
        '{"version": 1, "keys": [{"kid": "AAAAAAAAAAAAAAAA"}]}',
        '{"version": 1, "keys": [{"kid": "AAAAAAAAAAAAAAAA", "created": true}]}',
    ],
)
def test_a_malformed_index_is_refused(ring: Path, index: str) -> None:
    (ring / "ring.json").write_text(index)
    with pytest.raises(KeyRingError):
        load_signer(ring)


def test_a_directory_without_index_is_not_a_ring(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyRingError, match="not a key ring"):
        load_signer(d)


def test_signing_key_repr_hides_the_private_key(ring: Path) -> None:
    signer = load_signer(ring)
    assert repr(signer) == f"SigningKey(kid='{signer.kid}')"


def test_a_new_kid_never_begins_with_a_dash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kid beginning with ``-`` would read as an option on ``runner keys retire``: the ring
    draws again rather than hand one out. The first key offered here is one such key (found by
    drawing, about one in 64), so without the rule the ring would adopt it."""
    dashed = Ed25519PrivateKey.generate()
    while not key_id(dashed.public_key()).startswith("-"):
        dashed = Ed25519PrivateKey.generate()
    offered = iter([dashed])
    real_generate = Ed25519PrivateKey.generate
    monkeypatch.setattr(
        "privsep.secrets.keyring.Ed25519PrivateKey.generate",
        staticmethod(lambda: next(offered, None) or real_generate()),
    )
    kid = create_keyring(tmp_path / "keys", now=T0)
    assert not kid.startswith("-")
    assert kid != key_id(dashed.public_key())
    assert load_signer(tmp_path / "keys").kid == kid
