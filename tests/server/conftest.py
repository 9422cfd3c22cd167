"""Database fixtures for server tests: real SQLite files and a real PostgreSQL cluster.

Fixtures (all yield URLs as strings unless noted):

``postgres_cluster`` (session)
    The :class:`~.postgres.PostgresCluster`, started on first use only, so a run
    that selects SQLite tests alone never starts PostgreSQL. If ``initdb``/``pg_ctl`` are
    missing the PostgreSQL tests are skipped, unless ``PRIVSEP_REQUIRE_POSTGRES=1`` (set it in
    CI), which turns that into an error.
``postgres_url`` (session)
    One database in that cluster for the whole session (``postgresql+psycopg://``).
``db_url``
    Parametrized over ``sqlite`` and ``postgresql``: a fresh, empty database for each test.
``migrated_db_url``
    Like ``db_url``, upgraded to head. On PostgreSQL it is a copy of a template database that
    was upgraded once per session, which is faster than migrating per test.
``db``
    A :class:`privsep.server.db.Database` on ``migrated_db_url``, disposed after the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from privsep.server.db import Database, sqlite_url_for, upgrade

from .api import ApiHarness
from .postgres import PostgresCluster, own_cluster

BACKENDS = ["sqlite", "postgresql"]
TEMPLATE_DATABASE = "privsep_template"


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for the whole session, as an unprivileged user on 127.0.0.1."""
    with own_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """A database that lives as long as the session."""
    return postgres_cluster.url(postgres_cluster.create_database("privsep_session"))


@pytest.fixture(scope="session")
def _postgres_template(postgres_cluster: PostgresCluster) -> str:
    """A database upgraded to head once, copied by ``migrated_db_url``."""
    name = postgres_cluster.create_database(TEMPLATE_DATABASE)
    upgrade(postgres_cluster.url(name))
    return name


def _fresh_database(
    request: pytest.FixtureRequest, tmp_path: Path, *, migrated: bool
) -> Iterator[str]:
    if request.param == "sqlite":
        url = sqlite_url_for(tmp_path / "privsep.db")
        if migrated:
            upgrade(url)
        yield url
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    template = request.getfixturevalue("_postgres_template") if migrated else None
    name = cluster.create_database(template=template)
    try:
        yield cluster.url(name)
    finally:
        cluster.drop_database(name)


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh empty database per test, on each backend."""
    yield from _fresh_database(request, tmp_path, migrated=False)


@pytest.fixture(params=BACKENDS)
def migrated_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database at head per test, on each backend."""
    yield from _fresh_database(request, tmp_path, migrated=True)


@pytest.fixture
def db(migrated_db_url: str) -> Iterator[Database]:
    """A :class:`Database` on a fresh database at head."""
    database = Database.from_url(migrated_db_url)
    try:
        yield database
    finally:
        database.dispose()


@pytest.fixture
def api(db: Database, tmp_path: Path) -> Iterator[ApiHarness]:
    """The real API in-process on ``db``, with supervisors ``sup-a`` and ``sup-b``
    registered."""
    harness = ApiHarness(db, tmp_path)
    harness.register_supervisor("sup-a")
    harness.register_supervisor("sup-b")
    yield harness
    harness.client.close()
