"""The central logs' server side, against the real app on SQLite and PostgreSQL with real keys:
a chunk is stored once whatever the supervisor repeats, only a supervisor that held the item
may write its log, only an operator may read it, each log is capped, and the scheduler's pass
enforces the retention policy."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from privsep.secrets.tokens import issue_token
from privsep.server.db import Database
from privsep.server.db.models import AttemptLog, AttemptLogChunk, AttemptLogStream, AuditLog
from privsep.server.scheduler import LogRetention, scheduler_pass

from .api import ApiHarness, Work, bearer, error_code, task, workflow


@pytest.fixture
def api(db: Database, tmp_path: Path) -> Iterator[ApiHarness]:
    harness = ApiHarness(db, tmp_path, log_max_item_bytes=4096)
    harness.register_supervisor("sup-a")
    harness.register_supervisor("sup-b")
    yield harness
    harness.client.close()


def _claimed(api: ApiHarness) -> tuple[str, Work]:
    sess = api.supervisor_session("sup-a")
    api.define_workflow(sess, workflow("wf_logs", task("talk")))
    api.trigger_run(api.operator_session(), "wf_logs")
    (work,) = api.claim(sess, ["task"])
    return sess, work


def _chunk(
    item: str, offset: int, text: str, *, stream: str = "s1", final: bool = False, **extra: Any
) -> dict[str, Any]:
    return {
        "kind": "task",
        "item_id": item,
        "stream": stream,
        "offset": offset,
        "length": len(text.encode()),
        "text": text,
        "final": final,
        **extra,
    }


def _ship(api: ApiHarness, session: str, *chunks: dict[str, Any]) -> Any:
    return api.client.post(
        "/v1/supervisor/logs", json={"chunks": list(chunks)}, headers=bearer(session)
    )


def _read(api: ApiHarness, item: str, after: int = 0, token: str | None = None) -> Any:
    token = token or api.operator_session()
    return api.client.get(
        f"/v1/operator/attempts/{item}/log", params={"after": after}, headers=bearer(token)
    )


def _text(api: ApiHarness, item: str) -> str:
    body = _read(api, item).json()
    return "".join(chunk["text"] for chunk in body["chunks"])


def test_a_chunk_is_stored_once_whatever_is_repeated(api: ApiHarness) -> None:
    sess, work = _claimed(api)
    first = _ship(api, sess, _chunk(work.id, 0, "one\ntwo\n"))
    assert first.json() == {"acks": [{"item_id": work.id, "stream": "s1", "end": 8}]}
    # The answer was lost: the same chunk again, then a longer one from the same offset
    # (after a restart the file had grown), then one that starts past the end (a gap).
    assert _ship(api, sess, _chunk(work.id, 0, "one\ntwo\n")).json()["acks"][0]["end"] == 8
    assert _ship(api, sess, _chunk(work.id, 0, "one\ntwo\nthree\n")).json()["acks"][0]["end"] == 14
    gap = _ship(api, sess, _chunk(work.id, 20, "lost?\n"))
    assert gap.json()["acks"][0]["end"] == 14  # start again from 14: nothing stored
    assert _text(api, work.id) == "one\ntwo\nthree\n"
    page = _read(api, work.id).json()
    assert [c["seq"] for c in page["chunks"]] == [1, 2]
    assert page["next"] == 2 and page["complete"] is False and page["ended"] is False
    # Paging: after=next answers nothing new.
    assert _read(api, work.id, after=2).json()["chunks"] == []


def test_complete_once_the_attempt_ended_and_its_last_chunk_arrived(api: ApiHarness) -> None:
    sess, work = _claimed(api)
    _ship(api, sess, _chunk(work.id, 0, "start\n"))
    resp = api.client.post("/v1/task/succeed", json={}, headers=bearer(work.token))
    assert resp.status_code == 200, resp.text
    page = _read(api, work.id).json()
    assert page["ended"] is True and page["complete"] is False  # the tail may be on its way
    execution = work.body["execution"]
    assert execution == 1
    _ship(api, sess, _chunk(work.id, 6, "end\n", final=True, execution=execution))
    page = _read(api, work.id).json()
    assert page["complete"] is True
    assert "".join(c["text"] for c in page["chunks"]) == "start\nend\n"
    # A page that does not reach the end is not complete, even when the log is.
    assert _read_limited(api, work.id, 1)["complete"] is False


def _read_limited(api: ApiHarness, item: str, limit: int) -> Any:
    return api.client.get(
        f"/v1/operator/attempts/{item}/log",
        params={"limit": limit},
        headers=bearer(api.operator_session()),
    ).json()


def test_another_supervisor_cannot_write_an_attempts_log(api: ApiHarness) -> None:
    sess_a, work = _claimed(api)
    _ship(api, sess_a, _chunk(work.id, 0, "mine\n"))
    sess_b = api.supervisor_session("sup-b")
    for chunk in (
        _chunk(work.id, 0, "forged\n", stream="b1"),  # a stream of its own
        _chunk(work.id, 5, "forged\n"),  # A's stream
        _chunk("no-such-attempt", 0, "x\n", stream="b1"),
    ):
        resp = _ship(api, sess_b, chunk)
        assert resp.status_code == 403, resp.text
        assert error_code(resp) == "not_owner"
    # All or nothing: a request mixing an item of its own with A's stores neither.
    _held_by(api, "sup-b", "batch-b")
    own = _chunk("batch-b", 0, "own\n", stream="b1") | {"kind": "trigger"}
    assert _ship(api, sess_b, own, _chunk(work.id, 5, "x\n")).status_code == 403
    assert _text(api, work.id) == "mine\n"
    assert _read(api, "batch-b").status_code == 404
    assert _ship(api, sess_b, own).status_code == 200
    assert _text(api, "batch-b") == "own\n"


def _held_by(api: ApiHarness, supervisor: str, item: str) -> None:
    """What a claim of a trigger batch records (its id exists nowhere else)."""
    with api.state.db.write_session() as session:
        session.add(AuditLog(event="token_issued", actor=supervisor, subject=item))


def test_a_deferred_attempts_tail_still_belongs_to_its_supervisor(api: ApiHarness) -> None:
    sess, work = _claimed(api)
    _ship(api, sess, _chunk(work.id, 0, "before\n"))
    trigger = {"trigger": {"module": "m", "qualname": "T"}}
    resp = api.client.post("/v1/task/defer", json=trigger, headers=bearer(work.token))
    assert resp.json() == {"state": "deferred"}
    # The attempt holds no supervisor now; A held it, so A's last chunk (and a new stream
    # of it, for a file it had not shipped yet) still goes in. B, which never held it, not.
    assert _ship(api, sess, _chunk(work.id, 7, "deferring\n", final=True)).status_code == 200
    assert _ship(api, sess, _chunk(work.id, 0, "other file\n", stream="s2")).status_code == 200
    sess_b = api.supervisor_session("sup-b")
    assert _ship(api, sess_b, _chunk(work.id, 0, "x\n", stream="b1")).status_code == 403
    assert _text(api, work.id) == "before\ndeferring\nother file\n"


def test_only_an_operator_session_reads_a_log(api: ApiHarness) -> None:
    sess, work = _claimed(api)
    _ship(api, sess, _chunk(work.id, 0, "secret-ish output\n"))
    path = f"/v1/operator/attempts/{work.id}/log"
    assert api.client.get(path).status_code == 401  # anonymous
    for token in (work.token, sess):  # the task's own token, a supervisor session
        resp = api.client.get(path, headers=bearer(token))
        assert resp.status_code == 401, resp.text
        assert error_code(resp) == "bad_scope"
    assert _read(api, work.id).status_code == 200
    missing = _read(api, "no-such-attempt")
    assert missing.status_code == 404 and error_code(missing) == "not_found"


def test_a_sandbox_token_cannot_append(api: ApiHarness) -> None:
    _, work = _claimed(api)
    settings = api.state.settings
    for scope in ("task", "parse", "trigger", "operator"):
        token = issue_token(
            api.state.signer,
            issuer=settings.issuer,
            audience=settings.audience,
            subject=work.id,
            scope=scope,  # type: ignore[arg-type]
            ttl_seconds=60,
            extra={"try": 1, "sup": "x", "triggers": ["x"]},
        ).reveal()
        resp = _ship(api, token, _chunk(work.id, 0, "forged\n"))
        assert resp.status_code == 401, (scope, resp.text)
        assert error_code(resp) == "bad_scope"
    assert _ship(api, "", _chunk(work.id, 0, "forged\n")).status_code == 401
    assert _read(api, work.id).json()["chunks"] == []


def test_a_log_past_its_cap_is_cut_with_a_marker(api: ApiHarness) -> None:
    sess, work = _claimed(api)
    line = "x" * 99 + "\n"
    offset = 0
    for _ in range(60):  # 6000 bytes against a 4096-byte cap
        resp = _ship(api, sess, _chunk(work.id, offset, line))
        assert resp.status_code == 200, resp.text
        offset += len(line)
        assert resp.json()["acks"][0]["end"] == offset  # acknowledged, stored or not
    page = _read(api, work.id).json()
    text = "".join(c["text"] for c in page["chunks"])
    assert page["truncated"] is True
    assert text.startswith(line * 40)
    assert text.endswith(
        "[privsep: log truncated on the server: this log reached 4096 bytes "
        "(server.log_max_item_bytes)]\n"
    )
    assert len(text.encode()) <= 4096 + 200


def test_retention_deletes_logs_by_age_and_by_budget_in_a_scheduler_pass(
    api: ApiHarness, db: Database
) -> None:
    sess, work = _claimed(api)
    _ship(api, sess, _chunk(work.id, 0, "old\n" * 100))
    for n in range(3):
        item = f"batch-{n}"
        _held_by(api, "sup-a", item)
        chunk = _chunk(item, 0, f"batch {n}\n" * 50) | {"kind": "trigger"}
        assert _ship(api, sess, chunk).status_code == 200

    def count() -> int:
        with db.read_session() as session:
            return int(session.scalar(select(func.count()).select_from(AttemptLog)) or 0)

    now = datetime.now(UTC)
    # Retention off (0 days, no budget): nothing goes, however late it is.
    off = scheduler_pass(db, now + timedelta(days=400), log_retention=LogRetention(0, 0))
    assert off.logs_pruned == 0 and count() == 4
    # A budget smaller than all of them: the ones written to longest ago go first, and
    # only once quiet for a while (not what is being written now).
    budget = LogRetention(0, 400)  # four logs of 400 bytes each
    assert scheduler_pass(db, now, log_retention=budget).logs_pruned == 0
    with db.write_session() as session:
        for n, item in enumerate([work.id, "batch-0", "batch-1", "batch-2"]):
            log = session.get(AttemptLog, item)
            assert log is not None
            log.updated_at = now - timedelta(hours=5 - n)
    assert scheduler_pass(db, now, log_retention=budget).logs_pruned == 3
    with db.read_session() as session:
        assert list(session.scalars(select(AttemptLog.item_id))) == ["batch-2"]
    # Age: one day of retention, a pass two days on, and the last one goes too, with its
    # chunks and streams.
    result = scheduler_pass(db, now + timedelta(days=2), log_retention=LogRetention(1, 0))
    assert result.logs_pruned == 1 and count() == 0
    with db.read_session() as session:
        for model in (AttemptLogChunk, AttemptLogStream):
            assert session.scalar(select(func.count()).select_from(model)) == 0
