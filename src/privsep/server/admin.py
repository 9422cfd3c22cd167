"""Server-side administration, for the ``runner`` commands that run on the server host.

This is the server package's public face to the CLI: the runner calls these functions and
never reaches into models or sessions itself.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from privsep.server.db.engine import Database
from privsep.server.db.models import AuditLog, Supervisor


class AdminError(Exception):
    """A refusal with a message for people; the CLI prints it and exits 1."""


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


def register_supervisor(
    database_url: str, name: str, public_key_path: str, *, replace: bool = False
) -> str:
    """Register (or, with ``replace``, re-key) a supervisor; returns its id."""
    if not name or len(name) > 250:
        raise AdminError("a supervisor name is 1 to 250 characters")
    pem = read_public_key(public_key_path)
    db = Database.from_url(database_url)
    try:
        with db.write_session() as session:
            existing = session.scalars(select(Supervisor).where(Supervisor.name == name)).first()
            if existing is not None and not replace:
                raise AdminError(
                    f"supervisor {name!r} is already registered "
                    "(pass --replace to give it a new key)"
                )
            if existing is None:
                existing = Supervisor(name=name, public_key_pem=pem)
                session.add(existing)
                event = "supervisor_registered"
            else:
                existing.public_key_pem = pem
                existing.active = True
                event = "supervisor_rekeyed"
            session.flush()
            session.add(
                AuditLog(event=event, actor="cli", subject=existing.id, detail={"name": name})
            )
            return existing.id
    except OperationalError as exc:
        raise AdminError(
            f"cannot write to the database ({db.display_url}): "
            f"{str(exc.orig).splitlines()[0]} — did you run `runner db upgrade`?"
        ) from None
    finally:
        db.dispose()
