"""What every request handler shares: settings, the database, the signer and the verifiers.

Built once per server process by :func:`build_state`. Verifiers are the union of this
replica's key ring and the public keys other replicas published in ``signing_keys``, minus the
retired ones (:mod:`privsep.server.signing_keys`), so a token signed by any replica verifies on
every replica and a retired key verifies on none. The key set is a cache: it is re-read when
it is older than ``signing_keys_refresh`` seconds (before a token is verified against it) and
when a token names a kid it does not hold. A re-read also picks up a rotation of this
replica's own ring: the new key signs from then on, without a restart.

``reads`` is the pool of read-only driver connections for the hot task reads (see
:mod:`privsep.server.readpool`), used from worker threads. ``inline_reads`` is the same for the
event loop itself, on SQLite only: a read there is a few tens of microseconds of CPU against
the page cache, cheaper than the hop to a worker thread, and its connection gives up after
:data:`INLINE_BUSY_TIMEOUT_MS` (the caller then takes the threaded path) so a rare busy
database cannot stall the loop. A PostgreSQL read is a network round trip and never runs on
the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from privsep.secrets.fernet import FieldCipher
from privsep.secrets.keyring import SigningKey
from privsep.server.admin import bootstrap_operator
from privsep.server.db.engine import Database
from privsep.server.readpool import ReadPool
from privsep.server.settings import ServerSettings
from privsep.server.signing_keys import KeySet, SignerRetired, sync_ring
from privsep.server.token_cache import VerifiedTokenCache

log = logging.getLogger("privsep.server")

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
    keys: KeySet
    cipher: FieldCipher | None
    token_cache: VerifiedTokenCache = field(default_factory=VerifiedTokenCache)
    reads: ReadPool = field(init=False)
    inline_reads: ReadPool | None = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loaded_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.reads = ReadPool(self.db.engine)
        self.inline_reads = (
            ReadPool(self.db.engine, busy_timeout_ms=INLINE_BUSY_TIMEOUT_MS, max_idle=1)
            if self.db.engine.dialect.name == "sqlite"
            else None
        )

    @property
    def signer(self) -> SigningKey:
        """The key this replica signs with: its ring's newest, as of the last re-read."""
        return self.keys.signer

    @property
    def verifiers(self) -> dict[str, Ed25519PublicKey]:
        return self.keys.verifiers

    def keys_stale(self) -> bool:
        """Whether the key set is older than ``signing_keys_refresh``: a retirement recorded
        since may not be in it yet, so it must be re-read before a token is trusted."""
        return time.monotonic() - self._loaded_at >= self.settings.signing_keys_refresh

    def refresh_keys_if_stale(self) -> None:
        """Re-read the key set if it is stale (blocking: it reads the ring and the database)."""
        if self.keys_stale():
            self._reload(self.settings.signing_keys_refresh)

    def reload_verifiers(self, *, force: bool = False) -> bool:
        """Re-read the key set for a token with an unknown kid, at most once per
        ``_RELOAD_INTERVAL``; returns whether anything was re-read."""
        return self._reload(0.0 if force else _RELOAD_INTERVAL)

    def _reload(self, min_age: float) -> bool:
        with self._lock:
            if time.monotonic() - self._loaded_at < min_age:
                return False  # another thread re-read it meanwhile
            keys = sync_ring(self.db, self.settings.signing_keyring)
            if keys.signer_retired:
                # Keep signing with it (nothing better is at hand) but say so: every token
                # this replica issues is refused until its ring is rotated.
                log.error("%s", SignerRetired(keys.signer.kid, self.settings.signing_keyring))
            self.keys = keys
            self._loaded_at = time.monotonic()
            return True


def build_state(settings: ServerSettings, db: Database | None = None) -> ServerState:
    """The state of one server process. Raises :class:`SignerRetired` if its ring's signer is
    retired (the CLI checks that first and says so in one line)."""
    cipher = FieldCipher(list(settings.fernet_keys)) if settings.fernet_keys else None
    database = db or Database.from_url(settings.database_url)
    keys = sync_ring(database, settings.signing_keyring)
    if keys.signer_retired:
        raise SignerRetired(keys.signer.kid, settings.signing_keyring)
    if settings.wakeups_broker:
        from privsep.server.wakeups import install

        install(database, settings.wakeups_broker)
    state = ServerState(settings=settings, db=database, keys=keys, cipher=cipher)
    bootstrap_operator(state.db, settings.operator_name, settings.operator_public_key)
    return state
