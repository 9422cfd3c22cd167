"""Tokens and assertions under attack: every rejection is provoked with a real forged token.

Forgeries are built by hand from base64url segments and signed with ``cryptography`` or
``hmac`` directly, so a test shows exactly which bytes an attacker would send; nothing is
mocked. Time is passed in with ``now=``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pickle
import threading
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from forgery import b64, forge_eddsa, forge_hs256, segments

from privsep.secrets.keyring import (
    SigningKey,
    create_keyring,
    key_id,
    load_signer,
    load_verifiers,
    prune,
    rotate,
)
from privsep.secrets.redact import Secret, redact
from privsep.secrets.tokens import (
    REQUIRED_CLAIMS,
    Claims,
    MemoryReplayGuard,
    Token,
    TokenRejected,
    create_assertion,
    issue_token,
    unverified_issuer,
    verify_assertion,
    verify_token,
)

ISS = "privsep-server"
AUD = "privsep-api"
NOW = 1_700_000_000
TTL = 600


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "attempt-42",
        "scope": "task",
        "iat": NOW,
        "nbf": NOW,
        "exp": NOW + TTL,
        "jti": uuid.uuid4().hex,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


@pytest.fixture
def ring(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    create_keyring(d, now=NOW)
    return d


@pytest.fixture
def signer(ring: Path) -> SigningKey:
    return load_signer(ring)


@pytest.fixture
def verifiers(ring: Path) -> dict[str, Ed25519PublicKey]:
    return load_verifiers(ring)


def verify(token: str, verifiers: dict[str, Ed25519PublicKey], **kw: Any) -> Claims:
    kw.setdefault("now", NOW + 1)
    return verify_token(token, verifiers, issuer=ISS, audience=AUD, **kw)


def rejected(code: str, token: str, verifiers: dict[str, Ed25519PublicKey], **kw: Any) -> None:
    with pytest.raises(TokenRejected) as excinfo:
        verify(token, verifiers, **kw)
    assert excinfo.value.code == code, excinfo.value
    if token:
        assert token not in str(excinfo.value)


# --- the happy path --------------------------------------------------------------------


def test_issue_then_verify(signer: SigningKey, verifiers: dict[str, Ed25519PublicKey]) -> None:
    token = issue_token(
        signer,
        issuer=ISS,
        audience=AUD,
        subject="attempt-42",
        scope="task",
        ttl_seconds=TTL,
        extra={"try": 2, "sup": "node-1"},
        now=NOW,
    )
    got = verify(token.reveal(), verifiers, scopes={"task"})

    assert got == token.claims
    assert (got.iss, got.aud, got.sub, got.scope) == (ISS, AUD, "attempt-42", "task")
    assert (got.iat, got.nbf, got.exp) == (NOW, NOW, NOW + TTL)
    assert got.kid == signer.kid
    assert dict(got.extra) == {"try": 2, "sup": "node-1"}
    assert len(got.jti) == 32 and int(got.jti, 16) >= 0
    header = jwt.get_unverified_header(token.reveal())
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": signer.kid}


def test_every_token_gets_a_fresh_jti(signer: SigningKey) -> None:
    jtis = {
        issue_token(
            signer, issuer=ISS, audience=AUD, subject="s", scope="parse", ttl_seconds=60
        ).jti
        for _ in range(50)
    }
    assert len(jtis) == 50


@pytest.mark.parametrize("scope", ["supervisor", "operator", "parse", "trigger"])
def test_session_and_work_scopes(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey], scope: Any
) -> None:
    token = issue_token(
        signer, issuer=ISS, audience=AUD, subject="x", scope=scope, ttl_seconds=60, now=NOW
    )
    assert verify(token.reveal(), verifiers, scopes={scope}).scope == scope


def test_issue_refuses_bad_arguments(signer: SigningKey) -> None:
    common: dict[str, Any] = {"issuer": ISS, "audience": AUD, "subject": "s"}
    with pytest.raises(ValueError, match="scope"):
        issue_token(signer, **common, scope="admin", ttl_seconds=60)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        issue_token(signer, **common, scope="task", ttl_seconds=0)
    with pytest.raises(ValueError, match="override"):
        issue_token(signer, **common, scope="task", ttl_seconds=60, extra={"exp": 10**12})
    with pytest.raises(ValueError, match="subject"):
        issue_token(signer, issuer=ISS, audience=AUD, subject="", scope="task", ttl_seconds=1)


# --- algorithm attacks -----------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", ""])
def test_alg_none_is_rejected(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey], alg: str
) -> None:
    # An unsigned token: empty signature segment, as RFC 7519 section 6.1 writes it.
    token = segments({"alg": alg, "typ": "JWT", "kid": signer.kid}, claims()) + "."
    rejected("bad_algorithm", token, verifiers)


def test_alg_none_without_kid_is_rejected(verifiers: dict[str, Ed25519PublicKey]) -> None:
    token = segments({"alg": "none"}, claims()) + "."
    rejected("bad_algorithm", token, verifiers)


def test_hs256_signed_with_the_public_pem_is_rejected(
    signer: SigningKey, ring: Path, verifiers: dict[str, Ed25519PublicKey]
) -> None:
    # The classic key-confusion attack: the attacker knows the public key (it is published)
    # and uses its PEM, byte for byte as the server stores it, as an HMAC secret.
    pem = (ring / f"{signer.kid}.pub").read_bytes()
    token = forge_hs256({"alg": "HS256", "typ": "JWT", "kid": signer.kid}, claims(), pem)
    # The forgery is a genuine HS256 token under that secret...
    signing_input, _, sig = token.rpartition(".")
    assert hmac.compare_digest(
        b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()), sig
    )
    # ...and it is still refused.
    rejected("bad_algorithm", token, verifiers)


@pytest.mark.parametrize("encoding", ["raw", "der", "pem-stripped"])
def test_hs256_signed_with_other_public_key_encodings_is_rejected(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey], encoding: str
) -> None:
    public = signer.public_key()
    secret = {
        "raw": public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        "der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "pem-stripped": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).strip(),
    }[encoding]
    token = forge_hs256({"alg": "HS256", "kid": signer.kid}, claims(), secret)
    rejected("bad_algorithm", token, verifiers)


def test_hmac_signature_under_an_eddsa_label_is_rejected(
    signer: SigningKey, ring: Path, verifiers: dict[str, Ed25519PublicKey]
) -> None:
    pem = (ring / f"{signer.kid}.pub").read_bytes()
    token = forge_hs256({"alg": "EdDSA", "kid": signer.kid}, claims(), pem)
    rejected("bad_signature", token, verifiers)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "Ed25519", "EdDSA ", "eddsa", "HS512"])
def test_other_algorithms_are_rejected(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey], alg: str
) -> None:
    # Even with a valid Ed25519 signature: only the exact label "EdDSA" is accepted.
    token = forge_eddsa({"alg": alg, "kid": signer.kid}, claims(), signer.private_key)
    rejected("bad_algorithm", token, verifiers)


@pytest.mark.parametrize(
    "extra_header",
    [
        {"jku": "https://attacker.example/jwks.json"},
        {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}},
        {"x5u": "https://attacker.example/cert.pem"},
        {"crit": ["exp"]},
        {"b64": False, "crit": ["b64"]},
    ],
)
def test_headers_that_steer_verification_are_rejected(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey], extra_header: dict[str, Any]
) -> None:
    header = {"alg": "EdDSA", "kid": signer.kid, **extra_header}
    token = forge_eddsa(header, claims(), signer.private_key)
    rejected("malformed", token, verifiers)


# --- keys ------------------------------------------------------------------------------


def test_no_kid_is_rejected(signer: SigningKey, verifiers: dict[str, Ed25519PublicKey]) -> None:
    token = forge_eddsa({"alg": "EdDSA", "typ": "JWT"}, claims(), signer.private_key)
    rejected("unknown_key", token, verifiers)


def test_unknown_kid_is_rejected(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey]
) -> None:
    token = forge_eddsa({"alg": "EdDSA", "kid": "AAAAAAAAAAAAAAAA"}, claims(), signer.private_key)
    rejected("unknown_key", token, verifiers)


def test_a_key_outside_the_ring_is_rejected(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey]
) -> None:
    outsider = Ed25519PrivateKey.generate()
    # Under its own kid: we do not know that key.
    own = forge_eddsa({"alg": "EdDSA", "kid": key_id(outsider.public_key())}, claims(), outsider)
    rejected("unknown_key", own, verifiers)
    # Claiming our kid: the signature does not verify with our key.
    claimed = forge_eddsa({"alg": "EdDSA", "kid": signer.kid}, claims(), outsider)
    rejected("bad_signature", claimed, verifiers)


def test_a_tampered_payload_is_rejected(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey]
) -> None:
    token = issue_token(
        signer, issuer=ISS, audience=AUD, subject="attempt-1", scope="task", ttl_seconds=60
    ).reveal()
    header, payload, sig = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    body["sub"] = "attempt-2"  # someone else's attempt
    tampered = f"{header}.{b64(json.dumps(body).encode())}.{sig}"
    rejected("bad_signature", tampered, verifiers, now=None)
    # A flipped signature byte fails the same way.
    sig_bytes = bytearray(base64.urlsafe_b64decode(sig + "=="))
    sig_bytes[0] ^= 1
    rejected("bad_signature", f"{header}.{payload}.{b64(bytes(sig_bytes))}", verifiers, now=None)


# --- claims ----------------------------------------------------------------------------


@pytest.mark.parametrize("missing", REQUIRED_CLAIMS)
def test_each_required_claim_is_required(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey], missing: str
) -> None:
    token = forge_eddsa(
        {"alg": "EdDSA", "kid": signer.kid}, claims(**{missing: DROP}), signer.private_key
    )
    rejected("missing_claim", token, verifiers)


def test_wrong_audience_is_rejected(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey]
) -> None:
    token = issue_token(
        signer, issuer=ISS, audience="other-api", subject="s", scope="task", ttl_seconds=60
    )
    rejected("bad_audience", token.reveal(), verifiers, now=None)


def test_audience_list_is_rejected_even_if_it_names_us(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey]
) -> None:
    token = forge_eddsa(
        {"alg": "EdDSA", "kid": signer.kid}, claims(aud=[AUD, "other"]), signer.private_key
    )
    rejected("bad_audience", token, verifiers)


def test_wrong_issuer_is_rejected(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey]
) -> None:
    token = issue_token(
        signer, issuer="someone-else", audience=AUD, subject="s", scope="task", ttl_seconds=60
    )
    rejected("bad_issuer", token.reveal(), verifiers, now=None)


def test_expired_token_is_rejected_after_the_leeway(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey]
) -> None:
    token = issue_token(
        signer, issuer=ISS, audience=AUD, subject="s", scope="task", ttl_seconds=TTL, now=NOW
    ).reveal()
    assert verify(token, verifiers, now=NOW + TTL + 5).sub == "s"  # within the 5 s leeway
    rejected("expired", token, verifiers, now=NOW + TTL + 6)
    rejected("expired", token, verifiers, now=NOW + TTL + 1, leeway=0)


def test_nbf_in_the_future_is_rejected(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey]
) -> None:
    token = forge_eddsa(
        {"alg": "EdDSA", "kid": signer.kid}, claims(nbf=NOW + 60), signer.private_key
    )
    rejected("not_yet_valid", token, verifiers, now=NOW)
    assert verify(token, verifiers, now=NOW + 60).sub == "attempt-42"


def test_iat_in_the_future_is_rejected(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey]
) -> None:
    token = issue_token(
        signer, issuer=ISS, audience=AUD, subject="s", scope="task", ttl_seconds=60, now=NOW
    ).reveal()
    rejected("not_yet_valid", token, verifiers, now=NOW - 30)


def test_scope_not_allowed_here_is_rejected(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey]
) -> None:
    token = issue_token(
        signer, issuer=ISS, audience=AUD, subject="s", scope="task", ttl_seconds=60, now=NOW
    ).reveal()
    rejected("bad_scope", token, verifiers, scopes={"supervisor", "operator"})


@pytest.mark.parametrize("scope", ["admin", "", 7, ["task"]])
def test_unknown_scope_is_rejected(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey], scope: Any
) -> None:
    token = forge_eddsa(
        {"alg": "EdDSA", "kid": signer.kid}, claims(scope=scope), signer.private_key
    )
    rejected("bad_scope", token, verifiers)


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": "tomorrow"},
        {"exp": float(NOW + 60)},
        {"iat": True},
        {"nbf": None},
        {"sub": ""},
        {"sub": 42},
        {"jti": ["a"]},
        {"exp": NOW},  # not after iat
    ],
)
def test_claims_of_the_wrong_type_are_malformed(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey], overrides: dict[str, Any]
) -> None:
    token = forge_eddsa(
        {"alg": "EdDSA", "kid": signer.kid}, claims(**overrides), signer.private_key
    )
    rejected("malformed", token, verifiers)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-token",
        "a.b",
        "a.b.c",
        "....",
        "eyJhbGciOiJFZERTQSJ9.e+J.sig",
        "eyJhbGciOiJFZERTQSJ9.eyJ.sig=",
        "W10.eyJ.sig",  # header is a JSON list
        "x" * 9000,
    ],
)
def test_garbage_is_malformed(verifiers: dict[str, Ed25519PublicKey], token: str) -> None:
    rejected("malformed", token, verifiers)


def test_payload_that_is_not_an_object_is_malformed(
    signer: SigningKey, verifiers: dict[str, Ed25519PublicKey]
) -> None:
    signing_input = (
        b64(json.dumps({"alg": "EdDSA", "kid": signer.kid}).encode()) + "." + b64(b"[1, 2]")
    )
    token = signing_input + "." + b64(signer.private_key.sign(signing_input.encode()))
    rejected("malformed", token, verifiers)


def test_non_string_token_is_malformed(verifiers: dict[str, Ed25519PublicKey]) -> None:
    with pytest.raises(TokenRejected) as excinfo:
        verify_token(b"abc", verifiers, issuer=ISS, audience=AUD)  # type: ignore[arg-type]
    assert excinfo.value.code == "malformed"


# --- rotation --------------------------------------------------------------------------


def test_rotation_keeps_old_tokens_and_prune_ends_them(ring: Path) -> None:
    old_signer = load_signer(ring)
    old = issue_token(
        old_signer, issuer=ISS, audience=AUD, subject="s", scope="task", ttl_seconds=TTL, now=NOW
    )

    new_kid = rotate(ring, now=NOW + 10)
    new_signer = load_signer(ring)
    assert new_signer.kid == new_kid != old_signer.kid
    new = issue_token(
        new_signer, issuer=ISS, audience=AUD, subject="s", scope="task", ttl_seconds=TTL, now=NOW
    )
    assert jwt.get_unverified_header(new.reveal())["kid"] == new_kid
    assert new.kid == new_kid

    verifiers = load_verifiers(ring)
    assert verify(old.reveal(), verifiers).kid == old_signer.kid
    assert verify(new.reveal(), verifiers).kid == new_kid

    # Still inside the window: prune keeps the old key, the old token verifies.
    assert prune(ring, TTL, now=NOW + 10 + TTL) == []
    assert verify(old.reveal(), load_verifiers(ring)).kid == old_signer.kid

    assert prune(ring, TTL, now=NOW + 11 + TTL) == [old_signer.kid]
    after = load_verifiers(ring)
    rejected("unknown_key", old.reveal(), after)
    assert verify(new.reveal(), after).kid == new_kid


# --- values never printed --------------------------------------------------------------


def test_token_repr_hides_the_value(signer: SigningKey) -> None:
    token = issue_token(
        signer, issuer=ISS, audience=AUD, subject="s", scope="task", ttl_seconds=60, now=NOW
    )
    raw = token.reveal()
    assert raw.count(".") == 2
    expected = f"Token(jti={token.jti}, scope=task, exp={NOW + 60}, ***)"
    assert repr(token) == str(token) == f"{token}" == expected
    for shown in (repr(token), str(token), f"{token!r}", repr([token]), repr({"t": token})):
        assert raw not in shown
        for part in raw.split("."):
            assert part not in shown
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(token)


def test_token_is_a_token(signer: SigningKey) -> None:
    token = issue_token(signer, issuer=ISS, audience=AUD, subject="s", scope="task", ttl_seconds=1)
    assert isinstance(token, Token)


def test_secret_hides_its_value() -> None:
    secret = Secret("hunter2-password")
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret:>20}", repr([secret])):
        assert "hunter2" not in shown
    assert str(secret) == "***"
    assert secret.reveal() == "hunter2-password"
    assert secret == Secret("hunter2-password") != Secret("other")
    with pytest.raises(TypeError):
        "prefix " + secret  # type: ignore[operator]
    with pytest.raises(TypeError):
        json.dumps({"password": secret})
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(secret)


def test_redact_masks_every_occurrence() -> None:
    text = "user=alice pass=s3cr3t token=s3cr3t-and-more again s3cr3t"
    out = redact(text, ["s3cr3t", Secret("s3cr3t-and-more"), ""])
    assert out == "user=alice pass=*** token=*** again ***"
    assert redact("nothing here", []) == "nothing here"
    assert redact("a.b*c a.b*c", ["a.b*c"]) == "*** ***"  # regex characters are literal


# --- supervisor assertions -------------------------------------------------------------


@pytest.fixture
def sup_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def check_assertion(
    token: str,
    key: Ed25519PrivateKey,
    guard: MemoryReplayGuard | None = None,
    **kw: Any,
) -> Any:
    kw.setdefault("now", NOW + 1)
    kw.setdefault("audience", AUD)
    return verify_assertion(
        token,
        key.public_key(),
        replay_guard=guard if guard is not None else MemoryReplayGuard(clock=lambda: NOW + 1),
        **kw,
    )


def assertion_rejected(code: str, token: str, key: Ed25519PrivateKey, **kw: Any) -> None:
    with pytest.raises(TokenRejected) as excinfo:
        check_assertion(token, key, **kw)
    assert excinfo.value.code == code, excinfo.value


def test_assertion_round_trip(sup_key: Ed25519PrivateKey) -> None:
    token = create_assertion(sup_key, supervisor_name="node-1", audience=AUD, now=NOW)
    assert unverified_issuer(token) == "node-1"
    got = check_assertion(token, sup_key, supervisor_name="node-1")
    assert (got.iss, got.sub, got.aud, got.iat, got.exp) == ("node-1", "node-1", AUD, NOW, NOW + 30)
    assert len(got.jti) == 32


def test_assertion_replay_is_rejected(sup_key: Ed25519PrivateKey) -> None:
    guard = MemoryReplayGuard(clock=lambda: NOW + 1)
    token = create_assertion(sup_key, supervisor_name="node-1", audience=AUD, now=NOW)
    check_assertion(token, sup_key, guard)
    assertion_rejected("replayed", token, sup_key, guard=guard)
    # A fresh assertion from the same supervisor is fine.
    again = create_assertion(sup_key, supervisor_name="node-1", audience=AUD, now=NOW)
    check_assertion(again, sup_key, guard)


def test_a_rejected_assertion_does_not_use_up_its_jti(sup_key: Ed25519PrivateKey) -> None:
    guard = MemoryReplayGuard(clock=lambda: NOW + 1)
    token = create_assertion(sup_key, supervisor_name="node-1", audience=AUD, now=NOW)
    assertion_rejected("bad_audience", token, sup_key, guard=guard, audience="other")
    assert guard.tracked() == 0
    check_assertion(token, sup_key, guard)


def test_assertion_living_120_seconds_is_rejected(sup_key: Ed25519PrivateKey) -> None:
    payload = {
        "iss": "node-1",
        "sub": "node-1",
        "aud": AUD,
        "iat": NOW,
        "exp": NOW + 120,
        "jti": uuid.uuid4().hex,
    }
    token = forge_eddsa({"alg": "EdDSA", "typ": "JWT"}, payload, sup_key)
    assertion_rejected("bad_lifetime", token, sup_key)
    # Nor does our own helper make one.
    with pytest.raises(ValueError, match="ttl_seconds"):
        create_assertion(sup_key, supervisor_name="node-1", audience=AUD, ttl_seconds=120)
    with pytest.raises(ValueError, match="max_ttl"):
        check_assertion(token, sup_key, max_ttl=120)


def test_assertion_checks(sup_key: Ed25519PrivateKey) -> None:
    token = create_assertion(sup_key, supervisor_name="node-1", audience=AUD, now=NOW)
    assertion_rejected("bad_audience", token, sup_key, audience="another-server")
    assertion_rejected("bad_issuer", token, sup_key, supervisor_name="node-2")
    assertion_rejected("expired", token, sup_key, now=NOW + 36)
    assertion_rejected("not_yet_valid", token, sup_key, now=NOW - 60)
    # Verified with another supervisor's key: the kid in the header does not match it.
    assertion_rejected("unknown_key", token, Ed25519PrivateKey.generate())


def test_assertion_signed_by_another_key_is_rejected(sup_key: Ed25519PrivateKey) -> None:
    payload = {
        "iss": "node-1",
        "sub": "node-1",
        "aud": AUD,
        "iat": NOW,
        "exp": NOW + 30,
        "jti": uuid.uuid4().hex,
    }
    token = forge_eddsa({"alg": "EdDSA"}, payload, Ed25519PrivateKey.generate())
    assertion_rejected("bad_signature", token, sup_key)


def test_assertion_forgeries(sup_key: Ed25519PrivateKey) -> None:
    base = {
        "iss": "node-1",
        "sub": "node-1",
        "aud": AUD,
        "iat": NOW,
        "exp": NOW + 30,
        "jti": uuid.uuid4().hex,
    }
    public_pem = sup_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assertion_rejected("bad_algorithm", segments({"alg": "none"}, base) + ".", sup_key)
    assertion_rejected("bad_algorithm", forge_hs256({"alg": "HS256"}, base, public_pem), sup_key)
    assertion_rejected(
        "bad_subject", forge_eddsa({"alg": "EdDSA"}, {**base, "sub": "node-2"}, sup_key), sup_key
    )
    for name in base:
        partial = {k: v for k, v in base.items() if k != name}
        assertion_rejected(
            "missing_claim", forge_eddsa({"alg": "EdDSA"}, partial, sup_key), sup_key
        )


def test_unverified_issuer_of_garbage() -> None:
    with pytest.raises(TokenRejected) as excinfo:
        unverified_issuer("garbage")
    assert excinfo.value.code == "malformed"


# --- the replay guard ------------------------------------------------------------------


def test_memory_replay_guard_expires_entries() -> None:
    clock = [1000.0]
    guard = MemoryReplayGuard(clock=lambda: clock[0])
    assert guard("a", 1035.0) is True
    assert guard("a", 1035.0) is False
    clock[0] = 1035.0  # up to keep_until the jti is still held
    assert guard("a", 1035.0) is False
    clock[0] = 1036.0  # past it: the assertion itself would be rejected as expired by now
    assert guard("b", 1060.0) is True
    assert guard.tracked() == 1  # "a" was swept
    assert guard("a", 1060.0) is True


def test_assertion_jti_is_held_through_the_leeway(sup_key: Ed25519PrivateKey) -> None:
    # The guard is asked to hold the jti until exp + leeway: until then the assertion would
    # still verify, so forgetting it earlier would open a replay window.
    calls: list[tuple[str, float]] = []

    def guard(jti: str, keep_until: float) -> bool:
        calls.append((jti, keep_until))
        return True

    token = create_assertion(sup_key, supervisor_name="node-1", audience=AUD, now=NOW)
    got = verify_assertion(
        token, sup_key.public_key(), audience=AUD, replay_guard=guard, leeway=5, now=NOW + 34
    )
    assert calls == [(got.jti, NOW + 30 + 5)]


def test_memory_replay_guard_admits_exactly_one_racer() -> None:
    guard = MemoryReplayGuard()
    results: list[bool] = []
    barrier = threading.Barrier(32)

    def race() -> None:
        barrier.wait()
        results.append(guard("same-jti", 2**40))

    threads = [threading.Thread(target=race) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 31 + [True]
