"""Which token-signing keys verify, shared by every replica through ``signing_keys``.

A replica verifies with the keys of its own ring plus the public keys other replicas published,
minus every key the table marks retired. Retired means "verifies nothing": not a token it
signed before, not one this replica cached, not after a restart. A rotation is different: the
key that stopped signing keeps verifying until it is pruned from the ring, so tokens in flight
survive it.

Each replica re-reads the table at least every ``server.signing_keys_refresh`` seconds (see
:class:`~privsep.server.state.ServerState`), and that interval is the whole delay between
``runner keys retire`` and the last replica refusing the key.

Two ways a key gets retired, both recorded in the table:

- an operator retires it (:func:`retire_signing_key`, ``runner keys retire KID``), which also
  removes it, private half included, from this host's ring;
- it was pruned from a ring (or removed by a retirement on another host): the ring records
  the kids it removed, and :func:`sync_ring` retires them. (Without that, a pruned key kept
  verifying from its published copy, even after a restart.)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from privsep.secrets.files import InsecureFileError
from privsep.secrets.keyring import (
    KeyRingError,
    SigningKey,
    list_keys,
    load_ring,
    load_verifiers,
    remove_key,
)
from privsep.server.admin import AdminError
from privsep.server.db.engine import Database
from privsep.server.db.models import AuditLog, utcnow
from privsep.server.db.models import SigningKey as SigningKeyRow


class SignerRetired(Exception):
    """The ring's current signer is retired: nothing it would sign could verify."""

    def __init__(self, kid: str, ring: str) -> None:
        super().__init__(
            f"the current signing key {kid} of {ring} is retired; "
            "run `runner keys rotate` to add a new one, then start the server again"
        )
        self.kid = kid


@dataclass(frozen=True)
class KeySet:
    """What a replica signs and verifies with, as of one look at its ring and the table."""

    signer: SigningKey
    verifiers: dict[str, Ed25519PublicKey]
    retired: frozenset[str]
    ring: str  # the ring's id: this deployment's public instance identity

    @property
    def signer_retired(self) -> bool:
        return self.signer.kid in self.retired


def _pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def _published(db: Database) -> list[Any]:
    """Every published key as plain rows (``kid``, ``public_key_pem``, ``created_at``,
    ``retired_at``)."""
    t = SigningKeyRow
    with db.read_session() as session:
        return list(
            session.execute(select(t.kid, t.public_key_pem, t.created_at, t.retired_at)).all()
        )


def sync_ring(db: Database, ring_dir: str) -> KeySet:
    """Publish this ring's new keys, retire the ones it records as removed, return the key set.

    Writes only when there is something to publish or retire, so the periodic re-read is one
    read statement. Two replicas sharing a ring may publish the same key at once: the loser's
    insert fails on the primary key and it simply reads again.
    """
    ring = load_ring(ring_dir)
    for attempt in (1, 2):
        rows = _published(db)
        known = {row.kid: row for row in rows}
        publish = [kid for kid in ring.verifiers if kid not in known]
        removed = [
            kid for kid in sorted(ring.removed) if kid in known and known[kid].retired_at is None
        ]
        if not (publish or removed):
            break
        try:
            with db.write_session() as session:
                for kid in publish:
                    session.add(SigningKeyRow(kid=kid, public_key_pem=_pem(ring.verifiers[kid])))
                for kid in removed:
                    _mark_retired(session, kid, actor="server", reason="removed from its ring")
        except IntegrityError:
            if attempt == 2:
                raise
            continue
        rows = _published(db)
        break
    retired = frozenset(row.kid for row in rows if row.retired_at is not None) | ring.removed
    verifiers = {kid: key for kid, key in ring.verifiers.items() if kid not in retired}
    for row in rows:
        if row.retired_at is None and row.kid not in verifiers:
            loaded = serialization.load_pem_public_key(row.public_key_pem.encode())
            if isinstance(loaded, Ed25519PublicKey):
                verifiers[row.kid] = loaded
    return KeySet(ring.signer, verifiers, retired, ring.ring_id)


def _mark_retired(session: Any, kid: str, *, actor: str, reason: str) -> bool:
    """Set ``retired_at`` unless it is set already; audit it. Returns whether it changed."""
    changed = session.execute(
        update(SigningKeyRow)
        .where(SigningKeyRow.kid == kid, SigningKeyRow.retired_at.is_(None))
        .values(retired_at=utcnow())
    ).rowcount
    if changed:
        session.add(
            AuditLog(event="signing_key_retired", actor=actor, subject=kid, detail={"why": reason})
        )
    return bool(changed)


# --- the server-host commands (``runner keys list|retire``) ---------------------------------


def check_signer(database_url: str, ring_dir: str) -> None:
    """Publish the ring's keys (retiring those pruned from it) before a server starts, and
    refuse with one line (:class:`AdminError`) if the ring's signer is retired."""
    db = Database.from_url(database_url)
    try:
        keys = sync_ring(db, ring_dir)
    except (OperationalError, ProgrammingError) as exc:
        raise _database_error(db, exc) from None
    except InsecureFileError as exc:
        raise AdminError(f"refusing the signing key ring: {exc}") from None
    except KeyRingError as exc:
        raise AdminError(f"{exc} (`runner keys rotate` creates the ring)") from None
    finally:
        db.dispose()
    if keys.signer_retired:
        raise AdminError(str(SignerRetired(keys.signer.kid, ring_dir)))


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _database_error(db: Database, exc: Exception) -> AdminError:
    orig = getattr(exc, "orig", exc)
    return AdminError(
        f"cannot use the database ({db.display_url}): {str(orig).splitlines()[0]} "
        "— did you run `runner db upgrade`?"
    )


def _ring_entries(ring_dir: str) -> list[Any]:
    try:
        return list_keys(ring_dir)
    except InsecureFileError as exc:
        raise AdminError(f"refusing the key ring: {exc}") from None
    except KeyRingError as exc:
        raise AdminError(str(exc)) from None


def list_signing_keys(database_url: str, ring_dir: str) -> list[dict[str, Any]]:
    """Every key this host's ring holds or the database published, oldest first.

    ``state`` is ``signing`` (this ring's current signer), ``verifying`` or ``retired``;
    ``in_ring`` says whether this host's ring holds the private key, ``published`` whether
    the database has it.
    """
    entries = _ring_entries(ring_dir)
    signer = entries[-1].kid
    db = Database.from_url(database_url)
    try:
        rows = {row.kid: row for row in _published(db)}
    except (OperationalError, ProgrammingError) as exc:
        raise _database_error(db, exc) from None
    finally:
        db.dispose()
    out: list[dict[str, Any]] = []
    for entry in entries:
        row = rows.pop(entry.kid, None)
        out.append(_listing(entry.kid, row, in_ring=True, signer=signer, created=entry.created))
    for kid, row in sorted(rows.items(), key=lambda item: item[1].created_at):
        out.append(_listing(kid, row, in_ring=False, signer=signer, created=None))
    return out


def _listing(
    kid: str, row: Any, *, in_ring: bool, signer: str, created: float | None
) -> dict[str, Any]:
    if row is not None and row.retired_at is not None:
        state = "retired"
    elif kid == signer:
        state = "signing"
    else:
        state = "verifying"
    when = datetime.fromtimestamp(created, UTC).isoformat() if created else None
    return {
        "kid": kid,
        "state": state,
        "created_at": when or _iso(row.created_at if row else None),
        "retired_at": _iso(row.retired_at if row else None),
        "in_ring": in_ring,
        "published": row is not None,
    }


def retire_signing_key(database_url: str, ring_dir: str, kid: str) -> str:
    """Retire ``kid`` everywhere: mark it in the database, then drop it from this host's ring.

    Refuses this ring's current signer (rotate first: retiring it would leave the servers
    signing tokens that nothing verifies). Returns what was done, for the operator.
    """
    entries = _ring_entries(ring_dir)
    if kid == entries[-1].kid:
        raise AdminError(
            f"{kid} is the key the server signs with; run `runner keys rotate` first, "
            "then retire it"
        )
    in_ring = kid in {e.kid for e in entries}
    db = Database.from_url(database_url)
    try:
        with db.write_session() as session:
            row = session.get(SigningKeyRow, kid)
            if row is None and not in_ring:
                raise AdminError(
                    f"no signing key {kid} in {ring_dir} or in the database "
                    "(`runner keys list` shows them)"
                )
            if row is None:  # never published (no server started since it was added)
                verifiers = load_verifiers(ring_dir)
                session.add(
                    SigningKeyRow(
                        kid=kid,
                        public_key_pem=_pem(verifiers[kid]),
                        retired_at=utcnow(),
                    )
                )
                session.add(
                    AuditLog(
                        event="signing_key_retired",
                        actor="cli",
                        subject=kid,
                        detail={"why": "retired by an operator"},
                    )
                )
                changed = True
            else:
                changed = _mark_retired(session, kid, actor="cli", reason="retired by an operator")
    except (OperationalError, ProgrammingError) as exc:
        raise _database_error(db, exc) from None
    finally:
        db.dispose()
    removed = False
    if in_ring:
        try:
            removed = remove_key(ring_dir, kid)
        except (InsecureFileError, KeyRingError) as exc:
            raise AdminError(
                f"{kid} is retired in the database, but removing it from {ring_dir} failed: {exc}"
            ) from None
    done = "retired" if changed else "was already retired"
    where = f"; removed it from {ring_dir}" if removed else ""
    return f"signing key {kid} {done}{where}"
