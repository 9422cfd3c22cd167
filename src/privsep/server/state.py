"""What every request handler shares: settings, the database, the signer and the verifiers.

Built once per server process by :func:`build_state`. Verifiers are the union of this
replica's key ring and the public keys other replicas published in ``signing_keys``, so a
token signed by any replica verifies on every replica.

``reads`` is the pool of read-only driver connections for the hot task reads (see
:mod:`privsep.server.readpool`), used from worker threads. ``inline_reads`` is the same for the
event loop itself, on SQLite only: a read there is a few tens of microseconds of CPU against
the page cache, cheaper than the hop to a worker thread, and its connection gives up after
:data:`INLINE_BUSY_TIMEOUT_MS` (the caller then takes the threaded path) so a rare busy
database cannot stall the loop. A PostgreSQL read is a network round trip and never runs on
the loop.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select

from privsep.secrets.fernet import FieldCipher
from privsep.secrets.keyring import SigningKey, load_signer, load_verifiers
from privsep.server.admin import bootstrap_operator
from privsep.server.db.engine import Database
from privsep.server.db.models import SigningKey as SigningKeyRow
from privsep.server.readpool import ReadPool
from privsep.server.settings import ServerSettings
from privsep.server.token_cache import VerifiedTokenCache

# An unknown kid makes us look in the database again, but not more often than this: a flood
# of tokens with made-up kids must not become a flood of queries.
_RELOAD_INTERVAL = 1.0

# How long a read on the event loop may wait for a SQLite lock before it gives up (WAL readers
# wait only in rare cases: recovery after a crash, the last connection closing).
INLINE_BUSY_TIMEOUT_MS = 20


@dataclass
class ServerState:
    settings: ServerSettings
    db: Database
    signer: SigningKey
    cipher: FieldCipher | None
    token_cache: VerifiedTokenCache = field(default_factory=VerifiedTokenCache)
    reads: ReadPool = field(init=False)
    inline_reads: ReadPool | None = field(init=False)
    _verifiers: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loaded_at: float = 0.0

    def __post_init__(self) -> None:
        self.reads = ReadPool(self.db.engine)
        self.inline_reads = (
            ReadPool(self.db.engine, busy_timeout_ms=INLINE_BUSY_TIMEOUT_MS, max_idle=1)
            if self.db.engine.dialect.name == "sqlite"
            else None
        )

    @property
    def verifiers(self) -> dict[str, Ed25519PublicKey]:
        return self._verifiers

    def publish_and_load_keys(self) -> None:
        """Publish this ring's public keys to the database, then load everyone's."""
        own = load_verifiers(self.settings.signing_keyring)
        with self.db.write_session() as session:
            known = set(session.scalars(select(SigningKeyRow.kid)))
            for kid, key in own.items():
                if kid not in known:
                    session.add(SigningKeyRow(kid=kid, public_key_pem=_pem(key)))
        self.reload_verifiers(force=True)

    def reload_verifiers(self, *, force: bool = False) -> bool:
        """Re-read published keys; returns whether anything was re-read."""
        with self._lock:
            if not force and time.monotonic() - self._loaded_at < _RELOAD_INTERVAL:
                return False
            keys = dict(load_verifiers(self.settings.signing_keyring))
            with self.db.read_session() as session:
                for row in session.scalars(select(SigningKeyRow)):
                    if row.kid not in keys:
                        loaded = serialization.load_pem_public_key(row.public_key_pem.encode())
                        if isinstance(loaded, Ed25519PublicKey):
                            keys[row.kid] = loaded
            self._verifiers = keys
            self._loaded_at = time.monotonic()
            return True


def _pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def build_state(settings: ServerSettings, db: Database | None = None) -> ServerState:
    cipher = FieldCipher(list(settings.fernet_keys)) if settings.fernet_keys else None
    state = ServerState(
        settings=settings,
        db=db or Database.from_url(settings.database_url),
        signer=load_signer(settings.signing_keyring),
        cipher=cipher,
    )
    state.publish_and_load_keys()
    bootstrap_operator(state.db, settings.operator_name, settings.operator_public_key)
    return state
