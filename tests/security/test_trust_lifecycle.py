"""Trust can be taken back: revoke or re-key a supervisor, revoke an operator, replay a token
of an earlier execution, and each grant ends at once.

Every attack goes through a real server (the FastAPI app with its fast path, over a real
SQLite file and a real PostgreSQL database, with real Ed25519 keys) and every revocation
through the real ``runner supervisors|operators`` commands, writing the same database as an
operator on the server host would. Two server replicas (two app states, each with its own key
ring and token cache) share the database where it matters: a revocation must hold on both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from privsep.runner.cli.main import main as runner_main
from privsep.secrets.tokens import create_assertion
from privsep.server.db import Database
from privsep.server.db.models import AttemptState, AuditLog, Operator, Supervisor, TaskAttempt
from privsep.server.state import build_state
from server import conftest as server_fixtures
from server.api import (
    AUDIENCE,
    ApiHarness,
    Work,
    bearer,
    error_code,
    public_pem,
    task,
    workflow,
)

# The database fixtures of the server tests (a fresh migrated SQLite file and PostgreSQL
# database per test, and the cluster behind them), shared rather than copied.
postgres_cluster = server_fixtures.postgres_cluster
_postgres_template = server_fixtures._postgres_template
migrated_db_url = server_fixtures.migrated_db_url
db = server_fixtures.db

TRIGGER = {"module": "workflows.etl", "qualname": "Sleep", "kwargs": {"seconds": 1}}


@pytest.fixture(autouse=True)
def next_sandbox_runs_normally() -> None:
    """These attacks go at the API, not at a sandbox: there is no sandbox whose health the
    suite's canary (tests/security/conftest.py) would check afterwards."""


@pytest.fixture
def api(db: Database, tmp_path: Path) -> Iterator[ApiHarness]:
    harness = ApiHarness(db, tmp_path / "replica-1")
    harness.register_supervisor("sup-a")
    harness.register_supervisor("sup-b")
    yield harness
    harness.client.close()


@pytest.fixture
def replica(api: ApiHarness, db: Database, tmp_path: Path) -> Iterator[ApiHarness]:
    """A second server on the same database, with its own signing keys and token cache."""
    harness = ApiHarness(db, tmp_path / "replica-2")
    harness.supervisors = api.supervisors
    yield harness
    harness.client.close()


@pytest.fixture
def runner(
    db: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Any:
    """``runner ARGS...`` on the server host: (exit status, stdout, stderr)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    for name in [n for n in os.environ if n.startswith("PRIVSEP")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PRIVSEP_HOME", str(home))
    monkeypatch.setenv("PRIVSEP__DATABASE__URL", db.engine.url.render_as_string(False))

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = runner_main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def write_public_key(path: Path, key: Ed25519PrivateKey) -> str:
    path.write_text(public_pem(key))
    return str(path)


def session(api: ApiHarness, name: str, key: Ed25519PrivateKey | None = None) -> Any:
    assertion = create_assertion(
        key or api.supervisors[name], supervisor_name=name, audience=AUDIENCE
    )
    return api.client.post("/v1/supervisor/session", json={"assertion": assertion})


def claim(api: ApiHarness, sess: str, kinds: list[str]) -> Any:
    return api.client.post(
        "/v1/supervisor/claim", json={"kinds": kinds, "max_items": 10}, headers=bearer(sess)
    )


def attempts_of(api: ApiHarness, task_id: str) -> list[tuple[int, AttemptState, str | None]]:
    with api.state.db.read_session() as s:
        rows = s.execute(
            select(TaskAttempt.try_number, TaskAttempt.state, TaskAttempt.supervisor_id)
            .where(TaskAttempt.task_id == task_id)
            .order_by(TaskAttempt.try_number)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def sup_id(api: ApiHarness, name: str) -> str:
    with api.state.db.read_session() as s:
        found = s.scalar(select(Supervisor.id).where(Supervisor.name == name))
    assert found is not None
    return found


def run_one_task(api: ApiHarness, sess: str, workflow_id: str, **options: Any) -> Work:
    """A workflow of one task (one retry), a run of it, and its attempt claimed by ``sess``."""
    api.define_workflow(sess, workflow(workflow_id, task("t", retries=1, **options)))
    api.trigger_run(api.operator_session(), workflow_id)
    (work,) = api.claim(sess, ["task"])
    return work


def assert_refused(resp: Any, code: str = "revoked") -> None:
    assert resp.status_code == 401, resp.text
    assert error_code(resp) == code


def task_calls_refused(api: ApiHarness, token: str) -> None:
    """Every way a task token is used: the fast path's reads and writes and the routes'."""
    headers = bearer(token)
    assert_refused(api.client.get("/v1/task/context", headers=headers))
    assert_refused(api.client.post("/v1/task/heartbeat", headers=headers))
    assert_refused(api.client.put("/v1/task/xcoms/k", json={"value": 1}, headers=headers))
    assert_refused(api.client.post("/v1/task/succeed", json={}, headers=headers))


# --- supervisors ----------------------------------------------------------------------------


def test_a_revoked_supervisor_is_refused_at_its_next_call_and_its_work_is_taken_back(
    api: ApiHarness, replica: ApiHarness, runner: Any
) -> None:
    sess = api.supervisor_session("sup-a")
    work = run_one_task(api, sess, "wf_revoke")
    # Both replicas honour the session and the task token before (and cache them).
    for server in (api, replica):
        assert server.client.post("/v1/supervisor/heartbeat", headers=bearer(sess)).is_success
        assert server.client.get("/v1/task/context", headers=bearer(work.token)).is_success

    code, out, _ = runner("supervisors", "revoke", "sup-a")
    assert code == 0
    assert out == (
        "revoked supervisor sup-a: its sessions end at their next call; took back 1 running "
        "attempts, 0 parse jobs and 0 triggers\n"
    )

    for server in (api, replica):
        assert_refused(server.client.post("/v1/supervisor/heartbeat", headers=bearer(sess)))
        assert_refused(claim(server, sess, ["task", "parse", "trigger"]))
        assert_refused(
            server.client.post(
                "/v1/supervisor/refresh",
                json={"kind": "task", "id": work.id},
                headers=bearer(sess),
            )
        )
        task_calls_refused(server, work.token)
    assert_refused(session(api, "sup-a"), "unknown_supervisor")

    # Taken back as the reaper does: the try is lost, the retry goes to another supervisor.
    a, b = sup_id(api, "sup-a"), sup_id(api, "sup-b")
    assert attempts_of(api, "t") == [
        (1, AttemptState.UP_FOR_RETRY, a),
        (2, AttemptState.QUEUED, None),
    ]
    with api.state.db.write_session() as s:  # the retry delay is the task's; skip it here
        s.execute(TaskAttempt.__table__.update().values(next_try_at=None))
    (retry,) = api.claim(api.supervisor_session("sup-b"), ["task"])
    assert retry.body["try_number"] == 2
    assert api.client.post("/v1/task/succeed", json={}, headers=bearer(retry.token)).is_success
    assert attempts_of(api, "t")[1] == (2, AttemptState.SUCCESS, b)

    code, out, _ = runner("supervisors", "list", "--json")
    listed = {row["name"]: row for row in json.loads(out)["supervisors"]}
    assert code == 0 and listed["sup-a"]["state"] == "revoked" and listed["sup-a"]["revoked_at"]
    assert listed["sup-b"]["state"] == "active" and listed["sup-b"]["last_heartbeat_at"]
    with api.state.db.read_session() as s:
        events = set(s.scalars(select(AuditLog.event).where(AuditLog.subject.in_([a, work.id]))))
    assert {"supervisor_revoked", "attempt_revoked"} <= events


def test_a_task_token_dies_with_its_supervisor_even_while_its_attempt_still_runs(
    api: ApiHarness,
) -> None:
    """``check_attempt`` itself asks whether the token's supervisor is still active: a
    supervisor deactivated without its work being taken back (by hand, or by an older server)
    leaves an attempt "running", and its token must still be refused, by the fast path too."""
    sess = api.supervisor_session("sup-a")
    work = run_one_task(api, sess, "wf_inactive")
    assert api.client.get("/v1/task/context", headers=bearer(work.token)).is_success
    with api.state.db.write_session() as s:
        s.get(Supervisor, sup_id(api, "sup-a")).active = False  # type: ignore[union-attr]
    assert attempts_of(api, "t")[0][1] is AttemptState.RUNNING
    task_calls_refused(api, work.token)


def test_re_keying_a_supervisor_ends_the_sessions_of_the_old_key(
    api: ApiHarness, runner: Any, tmp_path: Path
) -> None:
    old_key = api.supervisors["sup-a"]
    old_sess = api.supervisor_session("sup-a")
    work = run_one_task(api, old_sess, "wf_rekey")
    new_key = Ed25519PrivateKey.generate()
    pub = write_public_key(tmp_path / "new.pub", new_key)

    # The same key again changes nothing (standalone registers on every start).
    same = write_public_key(tmp_path / "same.pub", old_key)
    assert runner("supervisors", "register", "sup-a", "--public-key", same, "--replace")[0] == 0
    assert api.client.post("/v1/supervisor/heartbeat", headers=bearer(old_sess)).is_success

    code, out, _ = runner("supervisors", "register", "sup-a", "--public-key", pub, "--replace")
    assert code == 0 and out.startswith("registered supervisor sup-a (id ")

    assert_refused(api.client.post("/v1/supervisor/heartbeat", headers=bearer(old_sess)))
    assert_refused(claim(api, old_sess, ["task"]))
    task_calls_refused(api, work.token)
    assert attempts_of(api, "t")[0][1] is AttemptState.UP_FOR_RETRY
    # The old key opens nothing any more; the new one does, and works on.
    assert_refused(session(api, "sup-a", old_key), "unknown_key")
    fresh = session(api, "sup-a", new_key)
    assert fresh.status_code == 200, fresh.text
    assert claim(api, fresh.json()["token"], ["task"]).is_success


def test_a_session_opened_before_a_revocation_stays_dead_after_re_activation(
    api: ApiHarness, runner: Any, tmp_path: Path
) -> None:
    """Re-registering a revoked supervisor with the very same key brings back the supervisor,
    never the sessions it had before: each is bound to the key generation it was opened in."""
    sess = api.supervisor_session("sup-a")
    assert runner("supervisors", "revoke", "sup-a")[0] == 0
    pub = write_public_key(tmp_path / "a.pub", api.supervisors["sup-a"])
    assert runner("supervisors", "register", "sup-a", "--public-key", pub, "--replace")[0] == 0
    assert_refused(api.client.post("/v1/supervisor/heartbeat", headers=bearer(sess)))
    assert_refused(claim(api, sess, ["task"]))
    assert session(api, "sup-a").status_code == 200


def test_supervisor_commands_fail_in_one_line(api: ApiHarness, runner: Any, tmp_path: Path) -> None:
    code, out, err = runner("supervisors", "revoke", "nobody")
    assert (code, out) == (1, "")
    assert err == "runner: no supervisor 'nobody' is registered (runner supervisors list)\n"
    assert runner("supervisors", "revoke", "sup-a")[0] == 0
    assert runner("supervisors", "revoke", "sup-a")[1] == "supervisor sup-a was already revoked\n"
    pub = write_public_key(tmp_path / "x.pub", Ed25519PrivateKey.generate())
    code, _, err = runner("supervisors", "register", "sup-a", "--public-key", pub)
    assert code == 1
    assert err == (
        "runner: supervisor 'sup-a' is already registered (revoked) "
        "(pass --replace to give it a new key)\n"
    )


# --- operators ------------------------------------------------------------------------------


def operator_session(api: ApiHarness, key: Ed25519PrivateKey, asserted: str = "operator") -> Any:
    assertion = create_assertion(key, supervisor_name=asserted, audience=AUDIENCE)
    return api.client.post("/v1/operator/session", json={"assertion": assertion})


def test_a_revoked_operator_is_refused_at_its_next_call(
    api: ApiHarness, replica: ApiHarness, runner: Any, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    pub = write_public_key(tmp_path / "alice.pub", key)
    code, out, _ = runner("operators", "register", "alice", "--public-key", pub)
    assert code == 0 and out.startswith("registered operator alice (id ")
    resp = operator_session(api, key)
    assert resp.status_code == 200, resp.text
    token = resp.json()["token"]
    for server in (api, replica):
        assert server.client.get("/v1/operator/runs", headers=bearer(token)).is_success

    code, out, _ = runner("operators", "revoke", "alice")
    assert (code, out) == (0, "revoked operator alice: its sessions end at their next call\n")
    for server in (api, replica):
        assert_refused(server.client.get("/v1/operator/runs", headers=bearer(token)))
        assert_refused(server.client.get("/v1/operator/workflows", headers=bearer(token)))
    assert_refused(operator_session(api, key), "unknown_operator")

    code, out, _ = runner("operators", "list", "--json")
    listed = {row["name"]: row for row in json.loads(out)["operators"]}
    assert listed["alice"]["state"] == "revoked" and listed["alice"]["last_session_at"]
    assert listed["operator"]["state"] == "active"  # the configured key, bootstrapped


def test_the_audit_log_names_the_registered_operator_whatever_the_assertion_says(
    api: ApiHarness, runner: Any, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    pub = write_public_key(tmp_path / "alice.pub", key)
    assert runner("operators", "register", "alice", "--public-key", pub)[0] == 0
    resp = operator_session(api, key, asserted="root")
    assert resp.status_code == 200, resp.text
    token = resp.json()["token"]
    sess = api.supervisor_session("sup-a")
    api.define_workflow(sess, workflow("wf_audit", task("t")))
    resp = api.client.post(
        "/v1/operator/workflows/wf_audit/runs", json={"conf": {}}, headers=bearer(token)
    )
    assert resp.status_code == 200, resp.text
    with api.state.db.read_session() as s:
        actors = dict(
            s.execute(
                select(AuditLog.event, AuditLog.actor).where(
                    AuditLog.event.in_(["run_triggered", "session_opened"]),
                    AuditLog.actor.in_(["alice", "root"]),
                )
            ).all()
        )
    assert actors == {"session_opened": "alice", "run_triggered": "alice"}


def test_the_configured_operator_key_is_a_bootstrap_only(
    api: ApiHarness, db: Database, runner: Any
) -> None:
    """An existing deployment's configured key becomes operator ``operator`` on the first
    start; revoking it holds across a restart, which does not register it again."""
    token = api.operator_session()
    assert runner("operators", "revoke", "operator")[0] == 0
    assert_refused(api.client.get("/v1/operator/runs", headers=bearer(token)))
    restarted = build_state(api.state.settings, db)  # the configured key file is still there
    with restarted.db.read_session() as s:
        assert [o.active for o in s.scalars(select(Operator))] == [False]
    assert_refused(operator_session(api, api.operator_key), "unknown_operator")


def test_operator_commands_refuse_a_key_that_is_already_someone_elses(
    api: ApiHarness, runner: Any, tmp_path: Path
) -> None:
    pub = write_public_key(tmp_path / "op.pub", api.operator_key)
    code, out, err = runner("operators", "register", "mallory", "--public-key", pub)
    assert (code, out) == (1, "")
    assert err == "runner: that key is already registered to operator 'operator'\n"


# --- work tokens are bound to one execution -------------------------------------------------


def test_a_token_from_before_a_deferral_is_refused_once_the_attempt_resumes(
    api: ApiHarness,
) -> None:
    sess = api.supervisor_session("sup-a")
    before = run_one_task(api, sess, "wf_defer")
    resp = api.client.post(
        "/v1/task/defer", json={"trigger": TRIGGER}, headers=bearer(before.token)
    )
    assert resp.json() == {"state": "deferred"}
    (batch,) = api.claim(sess, ["trigger"])
    (trigger_id,) = batch.body["trigger_ids"]
    resp = api.client.post(
        f"/v1/trigger/{trigger_id}/event", json={"payload": 1}, headers=bearer(batch.token)
    )
    assert resp.status_code == 200
    # The same attempt row, the same try, the same supervisor: only the execution differs.
    (after,) = api.claim(sess, ["task"])
    assert (after.id, after.body["try_number"]) == (before.id, 1)
    assert api.client.get("/v1/task/context", headers=bearer(after.token)).is_success

    task_calls_refused(api, before.token)
    refreshed = api.client.post(
        "/v1/supervisor/refresh", json={"kind": "task", "id": after.id}, headers=bearer(sess)
    )
    assert refreshed.status_code == 200, refreshed.text
    assert api.client.get("/v1/task/context", headers=bearer(refreshed.json()["token"])).is_success
    # The live execution's token still ends its attempt; the replayed one never could.
    assert api.client.post("/v1/task/succeed", json={}, headers=bearer(after.token)).is_success
