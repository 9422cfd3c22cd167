"""Short-lived JWTs: work and session tokens signed by the server, and supervisor assertions.

Why so strict: a token is the only thing a sandboxed child holds, and the server checks one on
every API call. So verification accepts exactly one algorithm (EdDSA) and exactly the claims we
issue, and every way to fail maps to one :class:`TokenRejected` with a stable short ``code``
that the server turns into a 401 JSON error:

==================  =====================================================================
``malformed``       not a JWT, a claim of the wrong type, an unexpected header
``bad_algorithm``   ``alg`` is not ``EdDSA`` (``none``, ``HS256`` with the public key, ...)
``unknown_key``     no ``kid`` in the header, or one the verifier does not know
``bad_signature``   the signature does not verify with the named key
``missing_claim``   one of the required claims is absent
``bad_issuer``      ``iss`` is not the expected issuer
``bad_audience``    ``aud`` is not exactly the expected audience
``bad_subject``     (assertions) ``sub`` differs from ``iss``
``bad_scope``       ``scope`` is unknown or not allowed on this call
``expired``         ``exp`` has passed (beyond the leeway)
``not_yet_valid``   ``nbf`` or ``iat`` lies in the future (beyond the leeway)
``bad_lifetime``    (assertions) ``exp - iat`` exceeds the allowed maximum
``replayed``        (assertions) the ``jti`` was already used
==================  =====================================================================

Token values never appear in a message, a ``repr`` or a log line: :class:`Token` prints as
``Token(jti=..., scope=..., exp=..., ***)`` and only :meth:`Token.reveal` returns the string.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol, cast, get_args

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from privsep._token import Token as HiddenToken
from privsep.secrets.keyring import SigningKey, key_id

__all__ = [
    "ALGORITHM",
    "ASSERTION_CLAIMS",
    "MAX_ASSERTION_TTL",
    "REQUIRED_CLAIMS",
    "SCOPES",
    "AssertionClaims",
    "Claims",
    "MemoryReplayGuard",
    "RejectCode",
    "ReplayGuard",
    "Scope",
    "Token",
    "TokenRejected",
    "create_assertion",
    "issue_token",
    "unverified_issuer",
    "unverified_key_id",
    "verify_assertion",
    "verify_token",
]

ALGORITHM: Final = "EdDSA"
Scope = Literal["task", "parse", "trigger", "supervisor", "operator"]
SCOPES: Final[frozenset[str]] = frozenset(get_args(Scope))
REQUIRED_CLAIMS: Final = ("iss", "aud", "sub", "scope", "iat", "nbf", "exp", "jti")
ASSERTION_CLAIMS: Final = ("iss", "sub", "aud", "iat", "exp", "jti")
MAX_ASSERTION_TTL: Final = 60
# Far above any token we issue, far below anything that costs real work to parse.
MAX_TOKEN_LENGTH: Final = 8192
# Header fields we write; anything else (jku, jwk, x5u, crit, b64, ...) is refused, so no
# header can point verification at a key or change how the payload is read.
_ALLOWED_HEADER: Final = frozenset({"alg", "typ", "kid"})
# Header and payload are non-empty; the signature may be empty (alg=none) so that such a token
# is reported as bad_algorithm rather than malformed.
_COMPACT_JWS: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

RejectCode = Literal[
    "malformed",
    "bad_algorithm",
    "unknown_key",
    "bad_signature",
    "missing_claim",
    "bad_issuer",
    "bad_audience",
    "bad_subject",
    "bad_scope",
    "expired",
    "not_yet_valid",
    "bad_lifetime",
    "replayed",
]

# The only algorithm this JWS object knows: even a bug in our own checks could not make it
# verify an HMAC or an unsigned token.
_JWS: Final = jwt.PyJWS(algorithms=[ALGORITHM])


class TokenRejected(Exception):
    """A token or assertion failed verification.

    ``code`` is one of :data:`RejectCode`, stable and safe to send to the client; ``message``
    says which check failed and never contains the token.
    """

    def __init__(self, code: RejectCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: RejectCode = code
        self.message = message


@dataclass(frozen=True)
class Claims:
    """The verified claims of a work or session token.

    ``extra`` holds every claim beyond the registered ones (read-only), for example an
    attempt's try number that the server put there.
    """

    iss: str
    aud: str
    sub: str
    scope: Scope
    iat: int
    nbf: int
    exp: int
    jti: str
    kid: str
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class AssertionClaims:
    """The verified claims of a supervisor assertion (``iss`` == ``sub`` == supervisor name).

    A separate type from :class:`Claims` on purpose: an assertion proves who is asking for a
    session and must never be mistaken for a session or work token.
    """

    iss: str
    sub: str
    aud: str
    iat: int
    exp: int
    jti: str


class Token(HiddenToken):
    """A signed token whose value never shows up by accident.

    ``str()``, ``repr()`` and f-strings give ``Token(jti=..., scope=..., exp=..., ***)``; only
    :meth:`reveal` returns the JWT, to be called where it is written to a socket or header.
    """

    __slots__ = ("claims",)

    def __init__(self, value: str, claims: Claims) -> None:
        super().__init__(value, claims.exp)
        self.claims = claims

    @property
    def jti(self) -> str:
        return self.claims.jti

    @property
    def scope(self) -> Scope:
        return self.claims.scope

    @property
    def exp(self) -> int:
        return self.claims.exp

    @property
    def kid(self) -> str:
        return self.claims.kid

    def _shown(self) -> str:
        return f"jti={self.jti}, scope={self.scope}, exp={self.exp}"


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def issue_token(
    signer: SigningKey,
    *,
    issuer: str,
    audience: str,
    subject: str,
    scope: Scope,
    ttl_seconds: int,
    extra: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> Token:
    """Sign a work or session token with the ring's current key.

    ``extra`` adds claims of the caller's own (say, the try number); it may not override a
    registered claim, because the server's checks rely on exactly those values.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {sorted(SCOPES)}")
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be positive")
    for name, value in (("issuer", issuer), ("audience", audience), ("subject", subject)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(REQUIRED_CLAIMS))
    if clash:
        raise ValueError(f"extra claims may not override registered claims: {clash}")
    iat = int(_now(now))
    claims = Claims(
        iss=issuer,
        aud=audience,
        sub=subject,
        scope=scope,
        iat=iat,
        nbf=iat,
        exp=iat + int(ttl_seconds),
        jti=uuid.uuid4().hex,
        kid=signer.kid,
        extra=MappingProxyType(extra),
    )
    payload = {
        **extra,
        "iss": claims.iss,
        "aud": claims.aud,
        "sub": claims.sub,
        "scope": claims.scope,
        "iat": claims.iat,
        "nbf": claims.nbf,
        "exp": claims.exp,
        "jti": claims.jti,
    }
    value = jwt.encode(
        payload, signer.private_key, algorithm=ALGORITHM, headers={"kid": signer.kid}
    )
    return Token(value, claims)


def _unverified_header(token: object) -> dict[str, Any]:
    """Parse the protected header, cheaply and strictly, to learn ``alg`` and ``kid``.

    The whole token must be three base64url segments (checked with one regex, in C); PyJWT
    then parses and verifies the token once. Parsing the header twice through PyJWT would
    double its per-character alphabet check, which costs as much as the signature check.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise TokenRejected("malformed", "not a token of plausible size")
    if not _COMPACT_JWS.fullmatch(token):
        raise TokenRejected("malformed", "not a compact JWS (three base64url segments)")
    segment = token[: token.index(".")]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):
        raise TokenRejected("malformed", "header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise TokenRejected("malformed", "header is not a JSON object")
    return header


def _verified_payload(
    token: str, pick_key: Callable[[dict[str, Any]], Ed25519PublicKey]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the header, pick the key from it, verify the signature; return (header, payload)."""
    header = _unverified_header(token)
    alg = header.get("alg")
    if alg != ALGORITHM:
        shown = alg if isinstance(alg, str) and len(alg) <= 16 else "?"
        raise TokenRejected("bad_algorithm", f"algorithm {shown!r} is not allowed, only EdDSA")
    unexpected = set(header) - _ALLOWED_HEADER
    if unexpected:
        raise TokenRejected("malformed", f"unexpected header fields: {sorted(unexpected)[:5]}")
    key = pick_key(header)
    try:
        decoded = _JWS.decode_complete(token, key, algorithms=[ALGORITHM])
    except jwt.InvalidSignatureError:
        raise TokenRejected("bad_signature", "signature does not verify") from None
    except jwt.InvalidAlgorithmError:
        raise TokenRejected("bad_algorithm", "algorithm is not allowed, only EdDSA") from None
    except jwt.PyJWTError:
        raise TokenRejected("malformed", "not a valid JWS") from None
    if decoded["header"] != header:  # both parsers must have read the same header
        raise TokenRejected("malformed", "header is ambiguous")
    try:
        payload = json.loads(decoded["payload"])
    except (ValueError, RecursionError):
        raise TokenRejected("malformed", "payload is not JSON") from None
    if not isinstance(payload, dict):
        raise TokenRejected("malformed", "payload is not a JSON object")
    return header, payload


def _require(payload: Mapping[str, Any], names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in payload]
    if missing:
        raise TokenRejected("missing_claim", f"required claims missing: {missing}")


def _str_claim(payload: Mapping[str, Any], name: str) -> str:
    value = payload[name]
    if not isinstance(value, str) or not value:
        raise TokenRejected("malformed", f"claim {name!r} is not a non-empty string")
    return value


def _int_claim(payload: Mapping[str, Any], name: str) -> int:
    value = payload[name]
    # bool is an int in Python, and a float NumericDate is legal JSON but never ours.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenRejected("malformed", f"claim {name!r} is not an integer NumericDate")
    return value


def _check_iss_aud(payload: Mapping[str, Any], issuer: str, audience: str) -> tuple[str, str]:
    iss = _str_claim(payload, "iss")
    if iss != issuer:
        raise TokenRejected("bad_issuer", "token was issued by someone else")
    # Exactly one audience, as a string: a list could name us next to someone else.
    aud = payload["aud"]
    if not isinstance(aud, str):
        raise TokenRejected("bad_audience", "audience must be a single string")
    if aud != audience:
        raise TokenRejected("bad_audience", "token is meant for another audience")
    return iss, aud


def _check_times(
    payload: Mapping[str, Any], t: float, leeway: float, *, nbf: bool
) -> tuple[int, int, int]:
    iat = _int_claim(payload, "iat")
    exp = _int_claim(payload, "exp")
    not_before = _int_claim(payload, "nbf") if nbf else iat
    if exp <= iat:
        raise TokenRejected("malformed", "exp is not after iat")
    if t > exp + leeway:
        raise TokenRejected("expired", "token has expired")
    if not_before > t + leeway:
        raise TokenRejected("not_yet_valid", "token is not valid yet (nbf in the future)")
    if iat > t + leeway:
        raise TokenRejected("not_yet_valid", "token was issued in the future (iat)")
    return iat, not_before, exp


def verify_token(
    token: str,
    verifiers: Mapping[str, Ed25519PublicKey],
    *,
    issuer: str,
    audience: str,
    scopes: Set[str] | None = None,
    leeway: float = 5,
    now: float | None = None,
) -> Claims:
    """Verify a work or session token and return its claims, or raise :class:`TokenRejected`.

    ``verifiers`` maps kid to an already-loaded key (from ``keyring.load_verifiers``), so
    this does no file access and no PEM parsing: it sits on every API request. ``scopes``
    limits which scopes this call accepts; ``None`` accepts any known scope.
    """
    t = _now(now)

    def pick(header: dict[str, Any]) -> Ed25519PublicKey:
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("unknown_key", "token header names no kid")
        key = verifiers.get(kid)
        if key is None:
            raise TokenRejected("unknown_key", "token is signed by a key not in the ring")
        return key

    header, payload = _verified_payload(token, pick)
    _require(payload, REQUIRED_CLAIMS)
    iss, aud = _check_iss_aud(payload, issuer, audience)
    sub = _str_claim(payload, "sub")
    jti = _str_claim(payload, "jti")
    iat, nbf, exp = _check_times(payload, t, leeway, nbf=True)
    scope = payload["scope"]
    if not isinstance(scope, str) or scope not in SCOPES:
        raise TokenRejected("bad_scope", "token carries an unknown scope")
    if scopes is not None and scope not in scopes:
        raise TokenRejected("bad_scope", f"scope {scope!r} is not allowed here")
    extra = {k: v for k, v in payload.items() if k not in REQUIRED_CLAIMS}
    return Claims(
        iss=iss,
        aud=aud,
        sub=sub,
        scope=cast(Scope, scope),  # checked against SCOPES just above
        iat=iat,
        nbf=nbf,
        exp=exp,
        jti=jti,
        kid=header["kid"],
        extra=MappingProxyType(extra),
    )


# --- supervisor assertions ----------------------------------------------------------------


class ReplayGuard(Protocol):
    """Records an assertion's ``jti``; returns False if it was already recorded.

    ``keep_until`` is the assertion's ``exp`` plus the verification leeway: until then the
    assertion would still be accepted, so the jti must be remembered at least that long;
    after it, forgetting is safe. Recording and testing must be one atomic step, or two
    requests racing with the same assertion could both pass: the server backs this with a
    table whose primary key is the jti.
    """

    def __call__(self, jti: str, keep_until: float) -> bool: ...


def create_assertion(
    private_key: Ed25519PrivateKey,
    *,
    supervisor_name: str,
    audience: str,
    ttl_seconds: int = 30,
    now: float | None = None,
) -> str:
    """A single-use proof of the supervisor's identity, signed with its long-lived key.

    The key itself never leaves the supervisor; the assertion is bound to one server
    (``aud``), lives at most a minute and carries a fresh ``jti`` the server remembers, so a
    captured assertion is worth one session at most, and only within that minute.
    """
    if not 0 < ttl_seconds <= MAX_ASSERTION_TTL:
        raise ValueError(f"ttl_seconds must be in (0, {MAX_ASSERTION_TTL}]")
    if not supervisor_name or not audience:
        raise ValueError("supervisor_name and audience must be non-empty")
    iat = int(_now(now))
    payload = {
        "iss": supervisor_name,
        "sub": supervisor_name,
        "aud": audience,
        "iat": iat,
        "exp": iat + int(ttl_seconds),
        "jti": uuid.uuid4().hex,
    }
    headers = {"kid": key_id(private_key.public_key())}
    return jwt.encode(payload, private_key, algorithm=ALGORITHM, headers=headers)


def unverified_issuer(token: str) -> str:
    """The ``iss`` of an assertion *before* verification, to look up that supervisor's key.

    Nothing in it is trusted until :func:`verify_assertion` has checked the signature with the
    key registered for that name.
    """
    _unverified_header(token)
    segment = token.split(".")[1]
    try:
        payload = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):
        raise TokenRejected("malformed", "payload is not base64url JSON") from None
    iss = payload.get("iss") if isinstance(payload, dict) else None
    if not isinstance(iss, str) or not iss:
        raise TokenRejected("missing_claim", "assertion names no issuer")
    return iss


def unverified_key_id(token: str) -> str:
    """The ``kid`` header of an assertion *before* verification: the fingerprint of the key
    that says it signed it, to look up whose key that is. Nothing is trusted until
    :func:`verify_assertion` has checked the signature with that registered key."""
    kid = _unverified_header(token).get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenRejected("unknown_key", "assertion names no key (kid)")
    return kid


def verify_assertion(
    token: str,
    public_key: Ed25519PublicKey,
    *,
    audience: str,
    replay_guard: ReplayGuard | Callable[[str, float], bool],
    supervisor_name: str | None = None,
    max_ttl: int = MAX_ASSERTION_TTL,
    leeway: float = 5,
    now: float | None = None,
) -> AssertionClaims:
    """Verify a supervisor assertion against that supervisor's registered key.

    On top of the usual checks it refuses an assertion that would live longer than
    ``max_ttl`` (at most 60 s), checks ``iss`` against ``supervisor_name`` when given (the
    name the key was looked up by) and, last of all, calls ``replay_guard(jti, exp + leeway)``
    to record the ``jti``: only an assertion that is otherwise valid uses up its jti, and a
    second use is ``replayed``.
    """
    if not 0 < max_ttl <= MAX_ASSERTION_TTL:
        raise ValueError(f"max_ttl must be in (0, {MAX_ASSERTION_TTL}]")
    t = _now(now)

    def pick(header: dict[str, Any]) -> Ed25519PublicKey:
        kid = header.get("kid")
        if kid is not None and kid != key_id(public_key):
            raise TokenRejected("unknown_key", "assertion names a key other than the registered")
        return public_key

    _header, payload = _verified_payload(token, pick)
    _require(payload, ASSERTION_CLAIMS)
    expected_iss = _str_claim(payload, "iss") if supervisor_name is None else supervisor_name
    iss, aud = _check_iss_aud(payload, expected_iss, audience)
    sub = _str_claim(payload, "sub")
    if sub != iss:
        raise TokenRejected("bad_subject", "assertion subject differs from its issuer")
    jti = _str_claim(payload, "jti")
    iat, _nbf, exp = _check_times(payload, t, leeway, nbf="nbf" in payload)
    if exp - iat > max_ttl:
        raise TokenRejected("bad_lifetime", f"assertion lives longer than {max_ttl} s")
    if not replay_guard(jti, float(exp) + leeway):
        raise TokenRejected("replayed", "assertion was already used")
    return AssertionClaims(iss=iss, sub=sub, aud=aud, iat=iat, exp=exp, jti=jti)


class MemoryReplayGuard:
    """An in-process :class:`ReplayGuard`: for tests and a single-process server.

    Entries are kept until their ``keep_until`` and swept as new ones arrive, so memory stays
    bounded by the assertions of the last minute or so.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}
        self._next_sweep = 0.0

    def __call__(self, jti: str, keep_until: float) -> bool:
        now = self._clock()
        with self._lock:
            if now >= self._next_sweep:
                self._seen = {k: v for k, v in self._seen.items() if v >= now}
                self._next_sweep = now + 1.0
            held = self._seen.get(jti)
            if held is not None and held >= now:
                return False
            self._seen[jti] = keep_until
            return True

    def tracked(self) -> int:
        """How many jtis are held right now (not ``__len__``: an empty guard must stay truthy)."""
        with self._lock:
            return len(self._seen)
