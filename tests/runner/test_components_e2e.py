"""The three component kinds end to end (issue 6): real server, real supervisor, real sandboxes.

One installation serves most tests of this module (setting one up costs several seconds on a
loaded two-core machine): its workflows folder holds the issue's ``etl`` example twice (once
granted its variable and connection by operator policy, once not), definition files that are
broken in each way a parse can fail, and small workflows for the trigger, timeout and database
isolation cases. The PostgreSQL isolation test has its own installation, whose server keeps
its metadata in a real PostgreSQL cluster.

Everything the tests check is read where an operator would read it: the operator API, ``runner
logs``, ``runner workflows errors``, and the metadata database itself (``sqlite3`` on
``state/privsep.db``) for what the API does not list (XComs, triggers, parse job times).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sqlite3
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography.fernet import Fernet
from stack import Stack, short_home

TESTS = Path(__file__).resolve().parent.parent
ETL = (TESTS / "client" / "workflows" / "etl.py").read_text()  # the example, verbatim
ETL_DENIED = ETL.replace('Workflow("etl"', 'Workflow("etl_denied"')
assert ETL_DENIED != ETL

UID_FIRST = 160_050  # this module's sandbox uid range (160000.. is test_supervisor_lifecycle's)
UID_FIRST_PG = 160_100
PARSE_TIMEOUT = 5

BROKEN_IMPORT = textwrap.dedent("""
    from privsep.client import Workflow

    wf = Workflow("broken_import")
    raise RuntimeError("this definition file is broken on purpose")
""")

CYCLE = textwrap.dedent("""
    from privsep.client import Context, Workflow

    wf = Workflow("cyclic")

    @wf.task(upstream=["second"])
    def first(ctx: Context) -> None:
        pass

    @wf.task(upstream=["first"])
    def second(ctx: Context) -> None:
        pass
""")

FOREVER = textwrap.dedent("""
    from privsep.client import Workflow

    wf = Workflow("forever")
    while True:
        pass
""")

STUBBORN = textwrap.dedent("""
    import signal
    from privsep.client import Workflow

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    wf = Workflow("stubborn")
    while True:
        pass
""")

TRIGGER_RAISES = textwrap.dedent("""
    from privsep.client import Context, Trigger, TriggerEvent, Workflow

    wf = Workflow("bad_trigger")

    class Explode(Trigger):
        def __init__(self, message: str):
            self.message = message

        async def run(self):
            raise ValueError(self.message)
            yield TriggerEvent(None)  # makes run() an async generator; never reached

    @wf.task
    def park(ctx: Context):
        if ctx.trigger_event is None:
            return ctx.defer(Explode("the trigger went bang"))
        return "resumed, which it must not"
""")

TIMES_OUT = textwrap.dedent("""
    import time
    from privsep.client import Context, Workflow

    wf = Workflow("times_out")

    @wf.task(timeout=2)
    def sleepy(ctx: Context) -> str:
        print("going to sleep for 30 s", flush=True)
        time.sleep(30)
        return "woke up, which it must not"
""")

# The task is handed the metadata database's location in the run's conf (as if it had leaked)
# and tries to read it. Every way of failing is reported the same way: the task raises
# ``GuardHeld`` naming what stopped it. Reading anything would return "LEAKED ...".
DB_GUARD = textwrap.dedent("""
    import os
    from privsep.client import Context, Workflow

    wf = Workflow("db_guard")

    class GuardHeld(Exception):
        pass

    @wf.task
    def peek_sqlite(ctx: Context) -> str:
        import sqlite3

        path = ctx.params.get("sqlite_path")
        if path is None:
            return "not asked"
        visible = os.path.exists(path)
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
            rows = conn.execute("SELECT name FROM supervisors").fetchall()
        except Exception as exc:
            raise GuardHeld(f"metadata db not readable (visible={visible}): {exc!r}") from None
        return f"LEAKED {rows}"

    @wf.task
    def peek_postgres(ctx: Context) -> str:
        import psycopg

        url = ctx.params.get("postgres_url")
        if url is None:
            return "not asked"
        try:
            with psycopg.connect(url, connect_timeout=3) as conn:
                rows = conn.execute("SELECT name FROM supervisors").fetchall()
        except Exception as exc:
            raise GuardHeld(f"metadata db not reachable: {type(exc).__name__}: {exc}") from None
        return f"LEAKED {rows}"
""")

WORKFLOWS = {
    "etl": ETL,
    "etl_denied": ETL_DENIED,
    "broken_import": BROKEN_IMPORT,
    "cyclic": CYCLE,
    "forever": FOREVER,
    "stubborn": STUBBORN,
    "bad_trigger": TRIGGER_RAISES,
    "times_out": TIMES_OUT,
    "db_guard": DB_GUARD,
}


def _new_stack(uid_first: int, **env: str) -> Stack:
    # A short home: a unix socket address holds at most 107 bytes.
    home = short_home("pc-")
    return Stack(
        home,
        uid_first=uid_first,
        PRIVSEP__SUPERVISOR__PARSE_TIMEOUT=str(PARSE_TIMEOUT),
        PRIVSEP__SUPERVISOR__PARALLELISM="3",
        PRIVSEP__SUPERVISOR__DRAIN_GRACE="2",
        PRIVSEP__SERVER__FERNET_KEY=Fernet.generate_key().decode(),
        **env,
    )


def _teardown(stack: Stack) -> None:
    stack.stop_all()
    shutil.rmtree(stack.home, ignore_errors=True)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = _new_stack(UID_FIRST)
    try:
        s.setup()
        for name, source in WORKFLOWS.items():
            (s.home / "workflows" / f"{name}.py").write_text(source)
        s.start_server()
        # The grants the etl workflow needs, and the values they grant; etl_denied gets none.
        for path, body in (
            ("/v1/operator/variables/etl_target", {"value": "warehouse_table"}),
            (
                "/v1/operator/connections/warehouse",
                {
                    "conn_type": "postgres",
                    "host": "db.example",
                    "port": 5432,
                    "login": "loader",
                    "password": "s3cret-password",
                    "schema": "analytics",
                },
            ),
        ):
            resp = s.operator("PUT", path, body)
            assert resp.status_code == 200, resp.text
        for kind, name in (("variable", "etl_target"), ("connection", "warehouse")):
            grant = {"workflow_pattern": "etl", "kind": kind, "name_pattern": name}
            resp = s.operator("POST", "/v1/operator/policy", grant)
            assert resp.status_code == 200, resp.text
        s.start("supervisor", "supervisor")
        yield s
    finally:
        _teardown(s)


# --- helpers ----------------------------------------------------------------------------------


def _db(stack: Stack) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{stack.home / 'state' / 'privsep.db'}?mode=ro", uri=True)


def _query(stack: Stack, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = _db(stack)
    try:
        return list(conn.execute(sql, args).fetchall())
    finally:
        conn.close()


def _trigger(stack: Stack, workflow_id: str, conf: dict[str, Any], timeout: float = 60) -> str:
    def attempt() -> str | None:
        resp = stack.operator("POST", f"/v1/operator/workflows/{workflow_id}/runs", {"conf": conf})
        return str(resp.json()["id"]) if resp.status_code == 200 else None

    return str(stack.wait_for(attempt, timeout, f"workflow {workflow_id} to be parsed"))


def _finish(stack: Stack, run_id: str, timeout: float) -> str:
    stack.wait_for(
        lambda: stack.run_state(run_id) in ("success", "failed"), timeout, f"run {run_id} to end"
    )
    return stack.run_state(run_id)


def _by_task(stack: Stack, run_id: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for attempt in stack.attempts(run_id):
        out.setdefault(attempt["task_id"], []).append(attempt)
    for tries in out.values():
        tries.sort(key=lambda a: a["try_number"])
    return out


def _xcoms(stack: Stack, run_id: str) -> dict[tuple[str, str], Any]:
    rows = _query(stack, "SELECT task_id, key, value FROM xcoms WHERE run_id = ?", run_id)
    return {(task, key): _json(value) for task, key, value in rows}


def _json(value: Any) -> Any:
    """A JSON column as SQLite hands it back: text, or a number it kept as a number."""
    return json.loads(value) if isinstance(value, str) else value


def _parse_errors(stack: Stack) -> dict[str, str]:
    rows = _query(stack, "SELECT file_path, message FROM parse_errors ORDER BY id")
    # file:///.../name.py, pinned to its content with a #sha256=... fragment or not
    return {Path(urlsplit(uri).path).stem: message for uri, message in rows}


# --- the etl example --------------------------------------------------------------------------


def test_etl_with_grants_succeeds_xcoms_flow_and_the_deferral_resumes(stack: Stack) -> None:
    run_id = _trigger(stack, "etl", {})
    state = _finish(stack, run_id, 120)
    tasks = _by_task(stack, run_id)
    assert state == "success", tasks
    assert {t: [a["state"] for a in tries] for t, tries in tasks.items()} == {
        "extract": ["success"],
        "load": ["success"],
        "wait_then_finish": ["success"],
    }
    # extract's return value reached load (which returned its rows), and the trigger's event
    # reached the resumed wait_then_finish (which returned what the trigger slept).
    xcoms = _xcoms(stack, run_id)
    assert xcoms[("extract", "return_value")] == {"rows": 3}
    assert xcoms[("load", "return_value")] == 3
    assert xcoms[("wait_then_finish", "return_value")] == 1.0
    # The trigger ran in a trigger sandbox of its own and fired.
    fired = _query(
        stack,
        "SELECT t.state, t.event FROM triggers t JOIN task_attempts a ON a.id = t.attempt_id "
        "WHERE a.run_id = ?",
        run_id,
    )
    assert [(s, _json(e)) for s, e in fired] == [("fired", {"payload": {"slept": 1.0}})]
    # load read the granted variable and connection; the connection's repr masks the password.
    logs = stack.runner("logs", tasks["load"][0]["id"])
    assert logs.returncode == 0, logs.stderr
    assert "loading 3 rows into warehouse_table" in logs.stdout
    assert "host='db.example'" in logs.stdout
    assert "password='***'" in logs.stdout
    assert "s3cret-password" not in logs.stdout


def test_etl_without_grants_fails_load_with_not_permitted_only(stack: Stack) -> None:
    run_id = _trigger(stack, "etl_denied", {})
    state = _finish(stack, run_id, 120)
    tasks = _by_task(stack, run_id)
    assert state == "failed", tasks
    assert [a["state"] for a in tasks["extract"]] == ["success"]
    # load has retries=2: three tries, each refused by policy.
    load = tasks["load"]
    assert [a["state"] for a in load] == ["up_for_retry", "up_for_retry", "failed"]
    for attempt in load:
        assert "NotPermitted" in (attempt["error"] or ""), attempt
        assert "not_granted" in (attempt["error"] or "") or "policy" in attempt["error"]
    # Its downstream task never ran (it could not), and nothing else failed.
    assert [a["state"] for a in tasks.get("wait_then_finish", [])] in ([], ["upstream_failed"])
    assert _xcoms(stack, run_id) == {("extract", "return_value"): {"rows": 3}}
    # The denials are in the audit log.
    for attempt in load:
        denied = _query(
            stack,
            "SELECT count(*) FROM audit_log WHERE event = 'request_denied' AND subject = ?",
            attempt["id"],
        )
        assert denied[0][0] >= 1, attempt


# --- parse errors -----------------------------------------------------------------------------


def test_bad_definition_files_give_parse_errors_and_the_rest_still_parse(stack: Stack) -> None:
    started = time.monotonic()
    errors = stack.wait_for(
        lambda: (e := _parse_errors(stack)).keys() >= {"broken_import", "cyclic"} and e,
        60,
        "the import error and the cycle to be stored as parse errors",
    )
    assert "this definition file is broken on purpose" in errors["broken_import"]
    assert "RuntimeError" in errors["broken_import"]
    assert "cycle" in errors["cyclic"]
    # Operators see them through `runner workflows errors`.
    shown = stack.runner("workflows", "errors", "--json")
    assert shown.returncode == 0, shown.stderr
    listed = {Path(urlsplit(e["file_path"]).path).stem for e in json.loads(shown.stdout)["errors"]}
    assert {"broken_import", "cyclic"} <= listed
    # Neither became a workflow; the good files beside them did.
    parsed = {row[0] for row in _query(stack, "SELECT id FROM workflows")}
    assert {"etl", "etl_denied", "bad_trigger", "times_out", "db_guard"} <= parsed
    assert not parsed & {"broken_import", "cyclic", "forever", "stubborn"}
    assert time.monotonic() - started < 60


def _ended_parse_job(stack: Stack, name: str) -> tuple[str, str] | None:
    rows = _query(
        stack,
        "SELECT claimed_at, finished_at FROM parse_jobs WHERE uri LIKE ? AND state = 'failed'",
        f"%/{name}.py%",
    )
    return (rows[0][0], rows[0][1]) if rows else None


def _seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def test_a_definition_file_that_loops_forever_gives_a_parse_error_at_the_timeout(
    stack: Stack,
) -> None:
    claimed, finished = stack.wait_for(
        lambda: _ended_parse_job(stack, "forever"), 60, "the endless parse to be stopped"
    )
    # Stopped at the parse timeout (the job's times are the server's).
    assert _seconds_between(claimed, finished) < PARSE_TIMEOUT + 10
    errors = stack.wait_for(
        lambda: "forever" in (e := _parse_errors(stack)) and e, 10, "a parse error for forever"
    )
    message = errors["forever"]
    assert "parse timeout" in message, message
    assert "forever.py" in message and "while True" in message  # where it was stuck
    assert "SystemExit" not in message


def test_a_definition_file_that_ignores_sigterm_still_gets_a_parse_error(stack: Stack) -> None:
    """Its parse sandbox cannot report anything (SIGKILL after the grace period), so the
    supervisor's outcome report is all the server hears of it."""
    claimed, finished = stack.wait_for(
        lambda: _ended_parse_job(stack, "stubborn"), 60, "the stubborn parse to be killed"
    )
    assert _seconds_between(claimed, finished) < PARSE_TIMEOUT + 15
    errors = stack.wait_for(
        lambda: "stubborn" in (e := _parse_errors(stack)) and e, 10, "a parse error for stubborn"
    )
    assert "wall-clock limit" in errors["stubborn"]


# --- triggers and timeouts --------------------------------------------------------------------


def test_a_trigger_that_raises_fails_its_task_with_the_error(stack: Stack) -> None:
    run_id = _trigger(stack, "bad_trigger", {})
    state = _finish(stack, run_id, 90)
    tasks = _by_task(stack, run_id)
    assert state == "failed", tasks
    [park] = tasks["park"]
    assert park["state"] == "failed"
    assert "trigger failed" in (park["error"] or "")
    assert "ValueError: the trigger went bang" in park["error"]
    states = _query(
        stack,
        "SELECT t.state FROM triggers t JOIN task_attempts a ON a.id = t.attempt_id "
        "WHERE a.run_id = ?",
        run_id,
    )
    assert states == [("failed",)]


def test_a_task_that_times_out_fails(stack: Stack) -> None:
    run_id = _trigger(stack, "times_out", {})
    started = time.monotonic()
    state = _finish(stack, run_id, 60)
    took = time.monotonic() - started
    tasks = _by_task(stack, run_id)
    assert state == "failed", tasks
    [sleepy] = tasks["sleepy"]
    assert sleepy["state"] == "failed"
    assert took < 25, f"a 2 s timeout took {took:.0f} s to end a 30 s sleep"
    # The sandbox's reason is recorded, not the SIGTERM's echo in the task's own code.
    assert "wall-clock limit of 2 s reached" in (sleepy["error"] or ""), sleepy
    assert "SystemExit" not in sleepy["error"]
    logs = stack.runner("logs", sleepy["id"])
    assert "going to sleep for 30 s" in logs.stdout


# --- the database isolation guard ---------------------------------------------------------------


def test_a_task_cannot_open_the_sqlite_metadata_database(stack: Stack) -> None:
    db_path = str(stack.home / "state" / "privsep.db")
    assert _query(stack, "SELECT count(*) FROM supervisors")[0][0] == 1  # it is there
    run_id = _trigger(stack, "db_guard", {"sqlite_path": db_path})
    _finish(stack, run_id, 90)
    tasks = _by_task(stack, run_id)
    [peek] = tasks["peek_sqlite"]
    error = peek["error"] or ""
    assert peek["state"] == "failed", peek
    # Hidden: the state directory does not even exist in the sandbox's view of the disk.
    assert "GuardHeld: metadata db not readable (visible=False)" in error, error
    assert "OperationalError('unable to open database file')" in error
    assert "LEAKED" not in error


@pytest.fixture(scope="module")
def postgres_stack() -> Iterator[tuple[Stack, str]]:
    postgres = _load_postgres_helpers()
    with postgres.own_cluster() as cluster:
        url = cluster.url(cluster.create_database("privsep_guard"))
        s = _new_stack(UID_FIRST_PG, PRIVSEP__DATABASE__URL=url)
        try:
            s.setup()
            (s.home / "workflows" / "db_guard.py").write_text(DB_GUARD)
            s.start_server()
            s.start("supervisor", "supervisor")
            yield s, url
        finally:
            _teardown(s)


def _load_postgres_helpers() -> ModuleType:
    """tests/server/postgres.py, the suite's real-cluster helper (tests/server is a package
    this directory's tests cannot import by name)."""
    name = "_privsep_tests_postgres"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS / "server" / "postgres.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_a_task_cannot_reach_the_postgres_metadata_database(
    postgres_stack: tuple[Stack, str],
) -> None:
    import psycopg

    stack, url = postgres_stack
    libpq_url = url.replace("postgresql+psycopg://", "postgresql://", 1)
    # The URL works from the host: the server keeps its state there.
    with psycopg.connect(libpq_url, connect_timeout=5) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM supervisors").fetchall()]
    assert names == ["sup-test"]
    run_id = _trigger(stack, "db_guard", {"postgres_url": libpq_url})
    _finish(stack, run_id, 90)
    tasks = _by_task(stack, run_id)
    [peek] = tasks["peek_postgres"]
    error = peek["error"] or ""
    assert peek["state"] == "failed", peek
    # Network policy "none": the sandbox's 127.0.0.1 is its own empty loopback.
    assert "GuardHeld: metadata db not reachable: OperationalError: connection failed" in error
    assert "LEAKED" not in error
    # The password in the URL the task was handed is not echoed into the recorded error.
    password = url.split(":")[2].split("@")[0]
    assert password not in error
