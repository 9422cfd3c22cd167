"""Server-side administration, for the ``runner`` commands that run on the server host.

This is the server package's public face to the CLI: the runner calls these functions and
never reaches into models or sessions itself.

Supervisors and operators are *principals*: a name, an Ed25519 public key, and a key
generation that every session token carries. Registering, re-keying and revoking write the
database directly (these commands run where the database credentials are), so they work with
every server replica stopped, and take effect on all of them at once: each call a session makes
reads the principal's row again (see :mod:`privsep.server.auth`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from privsep.secrets.keyring import key_id
from privsep.server.db.engine import Database
from privsep.server.db.models import AuditLog, Operator, Supervisor, utcnow
from privsep.server.reaper import Reaped, take_back_from

log = logging.getLogger("privsep.server.admin")

T = TypeVar("T")
Kind = Literal["supervisor", "operator"]


class AdminError(Exception):
    """A refusal with a message for people; the CLI prints it and exits 1."""


@dataclass(frozen=True)
class Principal:
    """One registered supervisor or operator, as ``runner supervisors|operators list`` shows
    it. ``last_seen`` is the last heartbeat of a supervisor, the last session of an operator."""

    name: str
    id: str
    key: str
    registered_at: datetime
    last_seen: datetime | None
    state: Literal["active", "revoked"]
    revoked_at: datetime | None
    key_generation: int

    def as_json(self, last_seen_as: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "key": self.key,
            "registered_at": self.registered_at.isoformat(),
            last_seen_as: self.last_seen.isoformat() if self.last_seen else None,
            "state": self.state,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "key_generation": self.key_generation,
        }


@dataclass(frozen=True)
class Revoked:
    """What a revocation (or a re-key) ended: whether the principal was active, and the work
    it held that was taken back."""

    was_active: bool
    taken_back: Reaped = field(default_factory=Reaped)


def read_public_key(path: str) -> str:
    """The PEM of an Ed25519 public key file, validated."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(65536)
    except OSError as exc:
        raise AdminError(f"cannot read public key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise AdminError(
            f"{path} is not a PEM public key (use the .pub file `runner credentials create` wrote)"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise AdminError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def fingerprint(pem: str) -> str:
    """The key id of a registered public key: what ``list`` shows and an assertion's ``kid``."""
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        return "(not Ed25519)"
    return key_id(key)


def _in_database(database_url: str, work: Callable[[Database], T]) -> T:
    """``work(db)`` on a database opened for this command, with a database that cannot be
    written (not migrated, unreachable) turned into one line."""
    db = Database.from_url(database_url)
    try:
        return work(db)
    except OperationalError as exc:
        raise AdminError(
            f"cannot use the database ({db.display_url}): "
            f"{str(exc.orig).splitlines()[0]} — did you run `runner db upgrade`?"
        ) from None
    finally:
        db.dispose()


def _check_name(kind: Kind, name: str) -> None:
    if not name or len(name) > 250:
        raise AdminError(f"a {kind} name is 1 to 250 characters")


def _audit(session: Session, event: str, subject: str, name: str, **detail: Any) -> None:
    session.add(
        AuditLog(event=event, actor="cli", subject=subject, detail={"name": name, **detail})
    )


# --- supervisors -----------------------------------------------------------------------------


def _supervisor(session: Session, name: str) -> Supervisor | None:
    """The supervisor called ``name``, its row locked for this transaction: a claim in flight
    holds it shared (services.claims), so a revocation waits for the claim to commit and then
    takes back what it claimed, or the claim sees the revocation."""
    return session.scalars(
        select(Supervisor).where(Supervisor.name == name).with_for_update()
    ).first()


def _end_supervisor_grant(session: Session, sup: Supervisor, why: str) -> Reaped:
    """Move the key generation on (every session opened before is refused at its next call)
    and take back the work the supervisor holds, whose tokens die with it."""
    sup.key_generation += 1
    session.flush()
    return take_back_from(session, sup.id, f"supervisor {sup.name} was {why}", "attempt_revoked")


def _refuse_unless_replacing(
    kind: str, name: str, existing: Supervisor | Operator | None, replace: bool
) -> None:
    """Registering a name that is taken needs ``--replace``: a typo must not re-key someone."""
    if existing is not None and not replace:
        state = "" if existing.active else " (revoked)"
        raise AdminError(
            f"{kind} {name!r} is already registered{state} (pass --replace to give it a new key)"
        )


def register_supervisor(
    database_url: str, name: str, public_key_path: str, *, replace: bool = False
) -> str:
    """Register (or, with ``replace``, re-key or re-activate) a supervisor; returns its id.

    A new key ends every session opened with the old one and takes back the work they hold.
    The same key again on an active supervisor changes nothing (``runner standalone`` registers
    on every start)."""
    _check_name("supervisor", name)
    pem = read_public_key(public_key_path)

    def work(db: Database) -> str:
        with db.write_session() as session:
            existing = _supervisor(session, name)
            _refuse_unless_replacing("supervisor", name, existing, replace)
            if existing is None:
                existing = Supervisor(name=name, public_key_pem=pem, key_generation=1)
                session.add(existing)
                session.flush()
                _audit(session, "supervisor_registered", existing.id, name, key=fingerprint(pem))
                return existing.id
            rekeyed = fingerprint(existing.public_key_pem) != fingerprint(pem)
            taken = _end_supervisor_grant(session, existing, "re-keyed") if rekeyed else Reaped()
            reactivated = not existing.active
            existing.public_key_pem = pem
            existing.active = True
            existing.revoked_at = None
            _audit(
                session,
                "supervisor_rekeyed" if rekeyed else "supervisor_reregistered",
                existing.id,
                name,
                key=fingerprint(pem),
                reactivated=reactivated,
                attempts_taken_back=taken.attempts,
            )
            return existing.id

    return _in_database(database_url, work)


_Registered = TypeVar("_Registered", Supervisor, Operator)


def _mark_revoked(kind: str, name: str, row: _Registered | None) -> _Registered | None:
    """Mark ``row`` revoked as of now and return it; None if it was revoked already (revoking
    twice is not an error). An unknown name is, naming the command that lists the known."""
    if row is None:
        raise AdminError(f"no {kind} {name!r} is registered (runner {kind}s list)")
    if not row.active:
        return None
    row.active = False
    row.revoked_at = utcnow()
    return row


def revoke_supervisor(database_url: str, name: str) -> Revoked:
    """Revoke a supervisor: its sessions end at their next call (401), the work it holds is
    taken back as lost (retried by another supervisor, per each task's retries) and its
    tokens die with it. It stays listed, revoked; ``register --replace`` brings it back."""

    def work(db: Database) -> Revoked:
        with db.write_session() as session:
            sup = _mark_revoked("supervisor", name, _supervisor(session, name))
            if sup is None:
                return Revoked(was_active=False)
            taken = _end_supervisor_grant(session, sup, "revoked")
            _audit(
                session,
                "supervisor_revoked",
                sup.id,
                name,
                attempts_taken_back=taken.attempts,
                parse_jobs_requeued=taken.parse_jobs,
                triggers_requeued=taken.triggers,
            )
            return Revoked(was_active=True, taken_back=taken)

    return _in_database(database_url, work)


def _principal(row: Supervisor | Operator, key: str, last_seen: datetime | None) -> Principal:
    """A supervisor's or an operator's row as the list commands show it."""
    state: Literal["active", "revoked"] = "active" if row.active else "revoked"
    return Principal(
        row.name,
        row.id,
        key,
        row.registered_at,
        last_seen,
        state,
        row.revoked_at,
        row.key_generation,
    )


def list_supervisors(database_url: str) -> list[Principal]:
    """Every registered supervisor, revoked ones too, by name."""

    def work(db: Database) -> list[Principal]:
        with db.read_session() as session:
            rows = session.scalars(select(Supervisor).order_by(Supervisor.name))
            return [_principal(s, fingerprint(s.public_key_pem), s.last_heartbeat_at) for s in rows]

    return _in_database(database_url, work)


# --- operators -------------------------------------------------------------------------------


def _operator(session: Session, name: str) -> Operator | None:
    return session.scalars(select(Operator).where(Operator.name == name).with_for_update()).first()


def _holder_of(session: Session, kid: str, other_than: str | None) -> str | None:
    """The name of the operator (other than ``other_than``) already registered with ``kid``:
    an operator is found by its key, so two may not share one."""
    query = select(Operator.name).where(Operator.key_id == kid)
    if other_than is not None:
        query = query.where(Operator.id != other_than)
    return session.scalar(query)


def register_operator(
    database_url: str, name: str, public_key_path: str, *, replace: bool = False
) -> str:
    """Register (or, with ``replace``, re-key or re-activate) an operator; returns its id. A
    new key ends every session opened with the old one."""
    _check_name("operator", name)
    pem = read_public_key(public_key_path)
    kid = fingerprint(pem)

    def work(db: Database) -> str:
        with db.write_session() as session:
            existing = _operator(session, name)
            _refuse_unless_replacing("operator", name, existing, replace)
            holder = _holder_of(session, kid, existing.id if existing else None)
            if holder is not None:
                raise AdminError(f"that key is already registered to operator {holder!r}")
            if existing is None:
                existing = Operator(name=name, public_key_pem=pem, key_id=kid, key_generation=1)
                session.add(existing)
                session.flush()
                _audit(session, "operator_registered", existing.id, name, key=kid)
                return existing.id
            rekeyed = existing.key_id != kid
            if rekeyed:
                existing.key_generation += 1
            reactivated = not existing.active
            existing.public_key_pem, existing.key_id = pem, kid
            existing.active, existing.revoked_at = True, None
            _audit(
                session,
                "operator_rekeyed" if rekeyed else "operator_reregistered",
                existing.id,
                name,
                key=kid,
                reactivated=reactivated,
            )
            return existing.id

    return _in_database(database_url, work)


def revoke_operator(database_url: str, name: str) -> Revoked:
    """Revoke an operator: its sessions end at their next call (401). It stays listed,
    revoked, and its key cannot open a session again until ``register --replace``."""

    def work(db: Database) -> Revoked:
        with db.write_session() as session:
            op = _mark_revoked("operator", name, _operator(session, name))
            if op is None:
                return Revoked(was_active=False)
            op.key_generation += 1
            _audit(session, "operator_revoked", op.id, name)
            return Revoked(was_active=True)

    return _in_database(database_url, work)


def list_operators(database_url: str) -> list[Principal]:
    """Every registered operator, revoked ones too, by name."""

    def work(db: Database) -> list[Principal]:
        with db.read_session() as session:
            rows = session.scalars(select(Operator).order_by(Operator.name))
            return [_principal(o, o.key_id, o.last_session_at) for o in rows]

    return _in_database(database_url, work)


def bootstrap_operator(db: Database, name: str, public_key_path: str) -> str | None:
    """Register the configured operator key (``server.operator_public_key``) as operator
    ``name`` when no operator is registered at all; returns its id, or ``None`` when nothing
    was done.

    This is the upgrade path of a deployment that had only the configured key, and the first
    start of a new one: once any operator is registered, the configured key is never read
    again, so it can neither come back after a revocation nor add an operator behind the
    registry's back. Several replicas starting at once register it once (the name is unique).
    """
    if not public_key_path or not name:
        return None
    with db.read_session() as session:
        if session.scalar(select(func.count()).select_from(Operator)):
            return None
    try:
        pem = read_public_key(public_key_path)
    except AdminError as exc:
        # A missing file is the ordinary "no configured key" case; anything else is worth a
        # line in the log, but not a server that refuses to start for supervisors.
        if "No such file" not in str(exc):
            log.warning("not registering the configured operator key: %s", exc)
        return None
    try:
        with db.write_session() as session:
            if session.scalar(select(func.count()).select_from(Operator)):
                return None
            op = Operator(name=name, public_key_pem=pem, key_id=fingerprint(pem), key_generation=1)
            session.add(op)
            session.flush()
            session.add(
                AuditLog(
                    event="operator_registered",
                    actor="server.operator_public_key",
                    subject=op.id,
                    detail={"name": name, "key": op.key_id, "from": public_key_path},
                )
            )
            return op.id
    except IntegrityError:  # another replica registered it first
        return None
