"""The metadata database: migrations, engine settings and schema rules, on SQLite and PostgreSQL.

Every test runs against a real database: a SQLite file in ``tmp_path`` or a database in the
session's PostgreSQL cluster (see ``conftest.py``). Nothing is mocked.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, event, func, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, StatementError

from privsep.server.db import (
    Base,
    Database,
    DatabaseURLError,
    NestedWriteSessionError,
    check,
    create_engine_for,
    display_url,
    head_revision,
    main_check,
    main_upgrade,
    sqlite_url_for,
    upgrade,
)
from privsep.server.db.migrate import ADVISORY_LOCK_KEY, UpgradeResult
from privsep.server.db.models import (
    AuditLog,
    ParseJob,
    Run,
    RunState,
    Supervisor,
    TaskAttempt,
    Trigger,
    UsedJti,
    Variable,
    Workflow,
    WorkflowVersion,
    XCom,
)

from .postgres import PostgresCluster, free_port

HEAD = "0008"
# Every revision, oldest first.
ALL = ("0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008")
THREAD_TIMEOUT_S = 60


def run_main(fn: Any, url: str) -> tuple[int, str]:
    out = io.StringIO()
    code = fn(url, out)
    return code, out.getvalue()


def row_counts(url: str) -> dict[str, int]:
    """Rows in every model table and in alembic_version."""
    engine = create_engine_for(url)
    try:
        with engine.connect() as conn:
            counts = {
                table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for table in Base.metadata.sorted_tables
            }
            counts["alembic_version"] = conn.execute(
                text("SELECT count(*) FROM alembic_version")
            ).scalar_one()
            return counts
    finally:
        engine.dispose()


@pytest.fixture
def pg_fresh_url(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """An empty PostgreSQL database, for the PostgreSQL-only tests."""
    name = postgres_cluster.create_database()
    try:
        yield postgres_cluster.url(name)
    finally:
        postgres_cluster.drop_database(name)


# --- migrations ------------------------------------------------------------------------------


def test_head_is_the_latest_revision() -> None:
    assert head_revision() == HEAD


def test_upgrade_twice_is_a_noop_and_creates_no_rows(db_url: str) -> None:
    first = upgrade(db_url)
    assert first == UpgradeResult(previous=None, current=HEAD, head=HEAD, applied=ALL)
    assert not first.already_at_head

    second = upgrade(db_url)
    assert second == UpgradeResult(previous=HEAD, current=HEAD, head=HEAD, applied=())
    assert second.already_at_head
    assert "already at head" in second.describe()

    assert check(db_url) == (HEAD, HEAD)
    counts = row_counts(db_url)
    assert counts.pop("alembic_version") == 1
    assert counts and all(n == 0 for n in counts.values()), counts


def test_db_check_exits_1_before_upgrade_and_0_after(db_url: str) -> None:
    code, out = run_main(main_check, db_url)
    assert (code, out) == (1, f"database at revision <none> (head {HEAD})\n")

    code, out = run_main(main_upgrade, db_url)
    assert code == 0
    assert out == (
        f"database upgraded from <none> to {HEAD} (head {HEAD}); applied {', '.join(ALL)}\n"
    )

    code, out = run_main(main_upgrade, db_url)
    assert (code, out) == (0, f"database already at head {HEAD}, nothing to do\n")

    code, out = run_main(main_check, db_url)
    assert (code, out) == (0, f"database at revision {HEAD} (head {HEAD})\n")


def test_a_database_newer_than_the_code_is_reported(db_url: str) -> None:
    upgrade(db_url)
    engine = create_engine_for(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    finally:
        engine.dispose()
    code, out = run_main(main_check, db_url)
    assert code == 1
    assert out == (
        f"database at revision f00d (head {HEAD}); "
        "the database is newer than this version of privsep\n"
    )
    code, out = run_main(main_upgrade, db_url)
    assert code == 1
    assert out.startswith("error: upgrade failed: ") and "f00d" in out and out.count("\n") == 1


def test_db_check_does_not_create_a_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    assert run_main(main_check, sqlite_url_for(path))[0] == 1
    assert not path.exists()


def test_sqlite_file_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "privsep.db"
    old_umask = os.umask(0o022)
    try:
        upgrade(sqlite_url_for(path))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_upgrade_on_an_empty_postgresql(pg_fresh_url: str) -> None:
    engine = create_engine_for(pg_fresh_url)
    try:
        assert inspect(engine).get_table_names() == []
        assert upgrade(pg_fresh_url, engine=engine).applied == ALL
        engine.dispose()  # the inspector caches; look again on a new connection
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert tables == {t.name for t in Base.metadata.sorted_tables} | {"alembic_version"}


def test_migrated_schema_matches_the_models(migrated_db_url: str) -> None:
    engine = create_engine_for(migrated_db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


# A process that upgrades ``argv[1]`` as soon as the file ``argv[2]`` exists.
UPGRADER = """
import json, sys, time
from pathlib import Path
from privsep.server.db import upgrade
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.002)
result = upgrade(sys.argv[1])
print(json.dumps({"applied": list(result.applied), "current": result.current}), flush=True)
"""


def test_concurrent_upgrades_apply_once(db_url: str, tmp_path: Path) -> None:
    """Three replicas running ``db upgrade`` at once: all succeed, exactly one does the work.

    Separate processes, as in production (Alembic itself is not re-entrant within a process).
    """
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", UPGRADER, db_url, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        go.touch()
        outputs = [proc.communicate(timeout=THREAD_TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    results = [json.loads(stdout) for stdout, _ in outputs]
    assert sorted(r["applied"] for r in results) == [[], [], list(ALL)]
    assert all(r["current"] == HEAD for r in results)
    assert row_counts(db_url)["alembic_version"] == 1


def test_postgresql_upgrade_waits_for_the_advisory_lock(pg_fresh_url: str) -> None:
    """Proof that the lock is taken: while someone else holds it, upgrade waits and does nothing."""
    conninfo = make_url(pg_fresh_url).set(drivername="postgresql").render_as_string(False)
    results: list[UpgradeResult] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(upgrade(pg_fresh_url))
        except BaseException as exc:
            errors.append(exc)

    with psycopg.connect(conninfo, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        thread = threading.Thread(target=worker)
        thread.start()
        deadline = time.monotonic() + THREAD_TIMEOUT_S
        waiting = 0
        while time.monotonic() < deadline and not waiting:
            row = holder.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()
            waiting = row[0] if row else 0
            time.sleep(0.05)
        assert waiting == 1
        assert thread.is_alive()
        row = holder.execute("SELECT to_regclass('alembic_version') IS NULL").fetchone()
        assert row == (True,)
        holder.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    thread.join(THREAD_TIMEOUT_S)
    assert not errors, errors
    assert [r.applied for r in results] == [ALL]


# --- URLs and error messages -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://alice:hunter2@db.example/privsep",
        "postgres://alice:hunter2@db.example/privsep",
        "postgresql+psycopg2://alice:hunter2@db.example/privsep",
        "postgresql+asyncpg://alice:hunter2@db.example/privsep",
    ],
)
def test_other_postgresql_urls_are_rejected_with_the_fix(url: str) -> None:
    with pytest.raises(DatabaseURLError) as info:
        create_engine_for(url)
    message = str(info.value)
    assert "write postgresql+psycopg://" in message
    assert "postgresql+psycopg://alice:***@db.example/privsep" in message
    assert "hunter2" not in message

    for fn, expected_code in ((main_check, 2), (main_upgrade, 1)):
        code, out = run_main(fn, url)
        assert code == expected_code
        assert out.count("\n") == 1 and out.startswith("error: ")
        assert "postgresql+psycopg://" in out and "hunter2" not in out


@pytest.mark.parametrize("url", ["mysql://alice:hunter2@db/x", "not a url :hunter2@"])
def test_unsupported_or_unparsable_urls_never_echo_the_password(url: str) -> None:
    with pytest.raises(DatabaseURLError) as info:
        create_engine_for(url)
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in display_url(url)


def test_display_url_hides_the_password() -> None:
    url = "postgresql+psycopg://alice:hunter2@db.example:5433/privsep"
    assert display_url(url) == "postgresql+psycopg://alice:***@db.example:5433/privsep"


def test_cannot_connect_is_one_line_with_host_and_port_but_no_password() -> None:
    port = free_port()
    url = f"postgresql+psycopg://alice:hunter2@127.0.0.1:{port}/privsep"
    for fn, expected_code in ((main_check, 2), (main_upgrade, 1)):
        code, out = run_main(fn, url)
        assert code == expected_code
        assert out.count("\n") == 1
        assert out.startswith(f"error: cannot connect to PostgreSQL at 127.0.0.1:{port}/privsep")
        assert "hunter2" not in out


def test_wrong_password_message_does_not_show_either_password(
    postgres_cluster: PostgresCluster, postgres_url: str
) -> None:
    url = make_url(postgres_url).set(password="wrong-hunter2").render_as_string(False)
    code, out = run_main(main_check, url)
    assert code == 2
    assert "password authentication failed" in out
    assert "wrong-hunter2" not in out and postgres_cluster.password not in out


def test_missing_sqlite_directory_is_one_line(tmp_path: Path) -> None:
    code, out = run_main(main_upgrade, sqlite_url_for(tmp_path / "nope" / "privsep.db"))
    assert code == 1
    assert out.startswith("error: cannot connect to SQLite database ") and out.count("\n") == 1


def test_sqlite_url_for_is_absolute_and_round_trips(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    url = sqlite_url_for("odd ?#% name.db")
    assert make_url(url).database == str(tmp_path / "odd ?#% name.db")
    upgrade(url)
    assert (tmp_path / "odd ?#% name.db").exists()


# --- SQLite: WAL and BEGIN IMMEDIATE -----------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = sqlite_url_for(tmp_path / "privsep.db")
    upgrade(url)
    return url


def test_sqlite_runs_in_wal_mode_with_foreign_keys(sqlite_url: str) -> None:
    database = Database.from_url(sqlite_url, sqlite_busy_timeout_ms=1234)
    try:
        with database.read_session() as session:
            pragma = session.connection().exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA foreign_keys").scalar() == 1
            assert pragma("PRAGMA busy_timeout").scalar() == 1234
        with pytest.raises(IntegrityError), database.write_session() as session:
            session.add(XCom(run_id="no-such-run", task_id="t", key="k", value=1))
    finally:
        database.dispose()


def test_sqlite_write_session_begins_immediate(sqlite_url: str) -> None:
    """The first writer holds the write lock from BEGIN, before it has written anything.

    With a deferred BEGIN the second writer's BEGIN would succeed, and the two would later
    deadlock on the lock upgrade. With BEGIN IMMEDIATE the second writer waits for
    busy_timeout at BEGIN and then fails with "database is locked"; readers are not blocked.
    """
    first = Database.from_url(sqlite_url)
    second = Database.from_url(sqlite_url, sqlite_busy_timeout_ms=300)
    statements: list[str] = []

    @event.listens_for(first.engine, "before_cursor_execute")
    def capture(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    try:
        with first.write_session() as session:
            assert statements[-1] == "BEGIN IMMEDIATE"
            raw = session.connection().connection.dbapi_connection
            assert raw is not None and raw.in_transaction

            started = time.monotonic()
            with (
                pytest.raises(OperationalError, match="database is locked"),
                second.write_session(),
            ):
                pass
            assert time.monotonic() - started >= 0.25  # it waited for busy_timeout

            with second.read_session() as reader:  # WAL: readers are not blocked
                assert reader.scalar(select(func.count()).select_from(Variable)) == 0

            session.add(Variable(key="k", value="v"))
        with second.write_session() as session:  # free again after commit
            assert session.get(Variable, "k") is not None
    finally:
        first.dispose()
        second.dispose()


def test_sqlite_nested_write_session_fails_fast(sqlite_url: str) -> None:
    """The inner BEGIN IMMEDIATE would wait on its own outer transaction's lock."""
    database = Database.from_url(sqlite_url)
    try:
        started = time.monotonic()
        with database.write_session() as outer:
            outer.add(Variable(key="k", value="v"))
            with pytest.raises(NestedWriteSessionError), database.write_session():
                pass
            with database.read_session() as reader:  # reading alongside is fine
                assert reader.get(Variable, "k") is None  # not committed yet
        assert time.monotonic() - started < 5
        with database.write_session() as session:  # the guard was reset
            assert session.get(Variable, "k") is not None
    finally:
        database.dispose()


def test_sqlite_concurrent_read_modify_write_serializes(sqlite_url: str) -> None:
    """Two writers that read then write: no SQLITE_BUSY and no lost update."""
    database = Database.from_url(sqlite_url)
    with database.write_session() as session:
        session.add(Variable(key="counter", value="0"))
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def increment() -> None:
        try:
            barrier.wait()
            with database.write_session() as session:
                variable = session.get(Variable, "counter")
                assert variable is not None
                time.sleep(0.2)
                variable.value = str(int(variable.value) + 1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=increment) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(THREAD_TIMEOUT_S)
        assert not errors, errors
        with database.read_session() as session:
            assert session.scalar(select(Variable.value).where(Variable.key == "counter")) == "2"
    finally:
        database.dispose()


# --- sessions and schema rules, on both backends ---------------------------------------------


def test_read_session_refuses_writes_and_leaves_the_connection_writable(
    migrated_db_url: str,
) -> None:
    # One pooled connection, so the read-only setting would leak into the next writer if it
    # were not reset.
    database = Database.from_url(migrated_db_url, pool_size=1, max_overflow=0)
    try:
        with pytest.raises(DBAPIError), database.read_session() as session:
            session.add(Variable(key="k", value="v"))
            session.flush()
        with database.write_session() as session:
            session.add(Variable(key="k", value="v"))
        with database.read_session() as session:
            assert session.scalar(select(Variable.value)) == "v"
        with database.write_session() as session:
            session.add(Variable(key="k2", value="v2"))
    finally:
        database.dispose()


def test_audit_log_is_append_only(db: Database) -> None:
    with db.write_session() as session:
        session.add(AuditLog(event="token.issued", actor="sup-1", detail={"scope": "task"}))
    with db.read_session() as session:
        entry = session.scalars(select(AuditLog)).one()
        entry_id = entry.id

    with pytest.raises(IntegrityError, match="append-only"), db.write_session() as session:
        session.execute(
            text("UPDATE audit_log SET event = 'forged' WHERE id = :id"), {"id": entry_id}
        )
    with pytest.raises(IntegrityError, match="append-only"), db.write_session() as session:
        session.execute(text("DELETE FROM audit_log"))
    with pytest.raises(IntegrityError, match="append-only"), db.write_session() as session:
        row = session.get(AuditLog, entry_id)
        assert row is not None
        row.actor = "someone else"
    if db.engine.dialect.name == "postgresql":
        with pytest.raises(IntegrityError, match="append-only"), db.write_session() as session:
            session.execute(text("TRUNCATE audit_log"))

    with db.write_session() as session:  # appending still works
        session.add(AuditLog(event="request.denied"))
    with db.read_session() as session:
        rows = session.execute(select(AuditLog.event, AuditLog.actor).order_by(AuditLog.id)).all()
    assert [tuple(r) for r in rows] == [("token.issued", "sup-1"), ("request.denied", None)]


def test_timestamps_are_aware_utc_on_both_backends(db: Database) -> None:
    plus_two = timezone(timedelta(hours=2))
    registered = datetime(2025, 3, 1, 14, 30, 15, 123456, tzinfo=plus_two)
    with db.write_session() as session:
        session.add(
            Supervisor(id="s1", name="node-1", public_key_pem="pem", registered_at=registered)
        )
    with db.read_session() as session:
        supervisor = session.get(Supervisor, "s1")
        assert supervisor is not None
        assert supervisor.registered_at == registered
        assert supervisor.registered_at.tzinfo == UTC
        assert supervisor.registered_at.hour == 12
        later = session.scalars(
            select(Supervisor.name).where(
                Supervisor.registered_at > datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
            )
        ).all()
        assert later == ["node-1"]
    with pytest.raises(StatementError, match="naive datetime"), db.write_session() as session:
        session.add(
            Supervisor(name="node-2", public_key_pem="pem", registered_at=datetime(2025, 1, 1))
        )


def test_cyclic_foreign_keys_and_a_full_run_graph_flush(db: Database) -> None:
    with db.write_session() as session:
        workflow = Workflow(id="etl")
        version = WorkflowVersion(workflow=workflow, definition="{}", content_hash="h")
        workflow.current_version = version
        run = Run(workflow=workflow, workflow_version=version)
        attempt = TaskAttempt(run=run, task_id="extract")
        trigger = Trigger(
            attempt=attempt, serialized={"module": "m", "qualname": "q", "kwargs": {}}
        )
        attempt.trigger = trigger
        # Added child first: the unit of work still inserts parents first.
        session.add_all([XCom(run=run, task_id="extract", key="k", value=[1]), run, workflow])
        session.flush()
        session.add(XCom(run_id=run.id, task_id="extract", key="k2", value=None))
    with db.read_session() as session:
        loaded = session.get(Workflow, "etl")
        assert loaded is not None and loaded.current_version is not None
        assert loaded.current_version.content_hash == "h"
        stored = session.scalars(select(TaskAttempt)).one()
        assert stored.trigger is not None and stored.trigger.attempt_id == stored.id
        assert stored.state == "queued" and stored.try_number == 1
        assert session.scalars(select(Run.state)).one() is RunState.QUEUED
        values = session.scalars(select(XCom.value).order_by(XCom.key)).all()
        assert values == [[1], None]


def test_state_columns_reject_unknown_states(db: Database) -> None:
    with pytest.raises(IntegrityError), db.write_session() as session:
        session.execute(
            text(
                "INSERT INTO parse_jobs (id, uri, bundle_version, state, created_at) "
                "VALUES ('p1', 'dags/a.py', '', 'bogus', :now)"
            ),
            {"now": datetime.now(UTC)},
        )
    with db.write_session() as session:
        session.add(ParseJob(uri="dags/a.py"))


def test_a_jti_can_be_used_once(db: Database) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=60)
    with db.write_session() as session:
        session.add(UsedJti(jti="abc", expires_at=expires))
    with pytest.raises(IntegrityError), db.write_session() as session:
        session.add(UsedJti(jti="abc", expires_at=expires))


def test_engine_for_postgresql_is_psycopg3(postgres_url: str) -> None:
    engine = create_engine_for(postgres_url)
    try:
        assert engine.dialect.driver == "psycopg"
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT current_setting('application_name')")) == "privsep"
    finally:
        engine.dispose()


def test_plain_sqlalchemy_engine_is_not_needed_for_reads(sqlite_url: str) -> None:
    """A stock engine can still read the file (e.g. sqlite3 CLI, backups): WAL is in the file."""
    engine = create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()
