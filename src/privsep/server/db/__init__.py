"""The server's metadata database: models, engines and sessions, migrations.

Only the server imports this package; it is the one component with database credentials.
See :mod:`.engine` for the SQLite/PostgreSQL settings and the read/write session choice, and
:mod:`.migrate` for ``runner db upgrade`` / ``runner db check``.
"""

from privsep.server.db.engine import (
    Database,
    DatabaseURLError,
    NestedWriteSessionError,
    create_engine_for,
    display_url,
    parse_url,
    sqlite_url_for,
)
from privsep.server.db.migrate import (
    MigrationError,
    UpgradeResult,
    check,
    head_revision,
    main_check,
    main_upgrade,
    upgrade,
)
from privsep.server.db.models import Base

__all__ = [
    "Base",
    "Database",
    "DatabaseURLError",
    "MigrationError",
    "NestedWriteSessionError",
    "UpgradeResult",
    "check",
    "create_engine_for",
    "display_url",
    "head_revision",
    "main_check",
    "main_upgrade",
    "parse_url",
    "sqlite_url_for",
    "upgrade",
]
