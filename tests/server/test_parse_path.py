"""The parse path's writes keep their meaning: who wins a claim, when a result is refused,
when a definition is a new version. Real database (SQLite and PostgreSQL), real auth.

The claim and result functions are also called directly (the route and the fast path call
the very same ones) where a test must stage what HTTP cannot: claimers racing in threads, or
a job that ends between the token check and the result's write.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from pydantic_core import from_json
from sqlalchemy import select

from privsep.server.auth import ParsePrincipal, SupervisorPrincipal
from privsep.server.db.models import (
    AuditLog,
    ParseError,
    ParseJob,
    ParseJobState,
    Supervisor,
    Workflow,
    WorkflowVersion,
)
from privsep.server.errors import ApiError
from privsep.server.schemas import ClaimRequest, ParseResultRequest
from privsep.server.services.claims import claim_work
from privsep.server.services.parse_results import store_result

from .api import ApiHarness, Work, bearer, error_code, task, workflow


def principal(api: ApiHarness, name: str) -> SupervisorPrincipal:
    with api.state.db.read_session() as session:
        row = session.execute(
            select(Supervisor.id, Supervisor.key_generation).where(Supervisor.name == name)
        ).first()
    assert row is not None
    return SupervisorPrincipal(row.id, name, row.key_generation)


def queue(api: ApiHarness, sess: str, uri: str, **fields: Any) -> str:
    resp = api.client.post(
        "/v1/supervisor/parse-jobs", json={"uri": uri, **fields}, headers=bearer(sess)
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def parse_once(api: ApiHarness, sess: str, uri: str, *definitions: dict[str, Any]) -> Work:
    """Queue, claim and answer one parse of ``uri`` with ``definitions``."""
    job_id = queue(api, sess, uri)
    (job,) = api.claim(sess, ["parse"], 1)
    assert job.id == job_id
    resp = api.client.post(
        "/v1/parse/result", json={"workflows": list(definitions)}, headers=bearer(job.token)
    )
    assert resp.status_code == 200, resp.text
    return job


def versions(api: ApiHarness, workflow_id: str) -> list[tuple[int, str | None]]:
    with api.state.db.read_session() as session:
        rows = session.execute(
            select(WorkflowVersion.id, WorkflowVersion.source_uri)
            .where(WorkflowVersion.workflow_id == workflow_id)
            .order_by(WorkflowVersion.id)
        ).all()
    return [(row[0], row[1]) for row in rows]


def job_row(api: ApiHarness, job_id: str) -> dict[str, Any]:
    """The parse job's row, read as plain values (a read session's objects expire with it)."""
    with api.state.db.read_session() as session:
        row = session.execute(select(ParseJob.__table__).where(ParseJob.id == job_id)).one()
    return dict(row._mapping)


def current(api: ApiHarness, workflow_id: str) -> tuple[int | None, str | None, bool]:
    with api.state.db.read_session() as session:
        row = session.execute(
            select(Workflow.current_version_id, Workflow.source_uri, Workflow.active).where(
                Workflow.id == workflow_id
            )
        ).one()
    return row[0], row[1], row[2]


def test_a_queued_parse_job_holds_what_discovery_sent(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    plain = queue(api, sess, "file:///w/a.py")
    pinned = queue(
        api, sess, "file:///w/b.py#sha256=ab", content_hash="ab", bundle_version="bundle-7"
    )
    a, b = job_row(api, plain), job_row(api, pinned)
    assert (a["state"], a["content_hash"], a["bundle_version"], a["supervisor_id"]) == (
        ParseJobState.QUEUED,
        None,
        "",
        None,
    )
    assert (b["uri"], b["content_hash"], b["bundle_version"]) == (
        "file:///w/b.py#sha256=ab",
        "ab",
        "bundle-7",
    )
    assert a["created_at"].tzinfo is not None and a["created_at"] <= b["created_at"]


def test_parse_jobs_are_claimed_oldest_first_up_to_the_limit_and_audited(
    api: ApiHarness,
) -> None:
    sess = api.supervisor_session("sup-a")
    ids = [queue(api, sess, f"file:///w/{n}.py", bundle_version="b1") for n in range(5)]
    first = api.claim(sess, ["task", "parse"], 3)
    second = api.claim(sess, ["parse"], 10)
    assert [w.id for w in first] == ids[:3] and [w.id for w in second] == ids[3:]
    assert [w.body["uri"] for w in first] == [f"file:///w/{n}.py" for n in range(3)]
    assert {w.body["bundle_version"] for w in first + second} == {"b1"}
    assert api.claim(sess, ["task", "parse"], 10) == []
    me = principal(api, "sup-a")
    jobs = [job_row(api, job_id) for job_id in ids]
    with api.state.db.read_session() as session:
        audited = session.execute(
            select(AuditLog.subject, AuditLog.actor, AuditLog.detail).where(
                AuditLog.event == "token_issued"
            )
        ).all()
    assert {(j["state"], j["supervisor_id"]) for j in jobs} == {
        (ParseJobState.RUNNING, me.supervisor_id)
    }
    assert all(j["claimed_at"] is not None and j["claimed_at"].tzinfo is not None for j in jobs)
    assert sorted(audited) == sorted((i, "sup-a", {"scope": "parse"}) for i in ids)


def test_racing_claimers_take_each_parse_job_exactly_once(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    ids = {queue(api, sess, f"file:///w/race{n}.py") for n in range(40)}
    claimers = [principal(api, "sup-a"), principal(api, "sup-b")] * 2
    taken: list[list[tuple[str, str]]] = [[] for _ in claimers]
    start = threading.Barrier(len(claimers))
    errors: list[BaseException] = []

    def claim_all(index: int) -> None:
        me = claimers[index]
        try:
            start.wait()
            while True:
                answer = from_json(
                    claim_work(api.state, me, ClaimRequest(kinds=["parse"], max_items=3))
                )
                if not answer["items"]:
                    return
                taken[index] += [(item["id"], me.supervisor_id) for item in answer["items"]]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(len(claimers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    claimed = [item for items in taken for item in items]
    assert sorted(job_id for job_id, _ in claimed) == sorted(ids)  # each once, none lost
    with api.state.db.read_session() as session:
        owners = dict(session.execute(select(ParseJob.id, ParseJob.supervisor_id)).all())
    assert all(owners[job_id] == sup for job_id, sup in claimed)


def test_a_result_for_a_job_that_is_no_longer_running_is_409_and_writes_nothing(
    api: ApiHarness,
) -> None:
    """The token check passed, then the job ended (a second result, the supervisor's
    outcome): the result's own conditional write refuses it."""
    sess = api.supervisor_session("sup-a")
    job = parse_once(api, sess, "file:///w/once.py", workflow("wf_once", task("a")))
    me = principal(api, "sup-a")
    again = ParseResultRequest.model_validate(
        {"workflows": [workflow("wf_once", task("a"), task("b", "a"))]}
    )
    for body in (again, ParseResultRequest(error="late")):
        with pytest.raises(ApiError) as refused:
            store_result(api.state, ParsePrincipal(job.id, me.supervisor_id), body)
        assert (refused.value.status, refused.value.code) == (409, "not_running")
    assert len(versions(api, "wf_once")) == 1
    with api.state.db.read_session() as session:
        assert session.scalars(select(ParseError.id)).all() == []
    ended = job_row(api, job.id)
    assert ended["state"] == ParseJobState.SUCCESS
    assert ended["finished_at"] is not None and ended["finished_at"].tzinfo is not None


def test_a_result_under_another_supervisor_is_409_and_the_job_keeps_running(
    api: ApiHarness,
) -> None:
    sess = api.supervisor_session("sup-a")
    job_id = queue(api, sess, "file:///w/theirs.py")
    (job,) = api.claim(sess, ["parse"])
    other = principal(api, "sup-b")
    with pytest.raises(ApiError) as refused:
        store_result(
            api.state, ParsePrincipal(job_id, other.supervisor_id), ParseResultRequest(error="x")
        )
    assert (refused.value.status, refused.value.code) == (409, "not_running")
    assert job_row(api, job_id)["state"] == ParseJobState.RUNNING
    resp = api.client.post("/v1/parse/result", json={"workflows": []}, headers=bearer(job.token))
    assert resp.status_code == 200, resp.text


def test_a_parse_error_is_stored_under_the_plain_path_and_fails_the_job(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    job_id = queue(api, sess, "file:///w/broken.py#sha256=ff", bundle_version="b9")
    (job,) = api.claim(sess, ["parse"])
    resp = api.client.post(
        "/v1/parse/result", json={"error": "SyntaxError: x"}, headers=bearer(job.token)
    )
    assert resp.status_code == 200, resp.text
    with api.state.db.read_session() as session:
        errors = session.execute(
            select(ParseError.file_path, ParseError.message, ParseError.bundle_version)
        ).all()
    assert [tuple(e) for e in errors] == [("file:///w/broken.py", "SyntaxError: x", "b9")]
    assert job_row(api, job_id)["state"] == ParseJobState.FAILED


def test_the_same_definition_from_the_same_file_is_one_version(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    definition = workflow("wf_same", task("a"), task("b", "a"))
    uri = "file:///w/same.py#sha256=01"
    parse_once(api, sess, uri, definition)
    parse_once(api, sess, uri, definition)
    ((version_id, source),) = versions(api, "wf_same")
    assert source == uri
    assert current(api, "wf_same") == (version_id, "file:///w/same.py", True)


def test_a_changed_file_or_definition_is_a_new_current_version(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    definition = workflow("wf_changed", task("a"))
    parse_once(api, sess, "file:///w/c.py#sha256=01", definition)
    # Same definition, other file contents (a task body changed): a new version.
    parse_once(api, sess, "file:///w/c.py#sha256=02", definition)
    # Other definition from the first file contents: a new version again.
    parse_once(api, sess, "file:///w/c.py#sha256=01", workflow("wf_changed", task("b")))
    stored = versions(api, "wf_changed")
    assert [uri for _, uri in stored] == [
        "file:///w/c.py#sha256=01",
        "file:///w/c.py#sha256=02",
        "file:///w/c.py#sha256=01",
    ]
    assert current(api, "wf_changed") == (stored[-1][0], "file:///w/c.py", True)
    # Going back to an earlier version makes it current again, without a fourth row.
    parse_once(api, sess, "file:///w/c.py#sha256=02", definition)
    assert versions(api, "wf_changed") == stored
    assert current(api, "wf_changed")[0] == stored[1][0]


def test_one_file_defines_several_workflows_and_a_deleted_file_comes_back(
    api: ApiHarness,
) -> None:
    sess = api.supervisor_session("sup-a")
    uri = "file:///w/pair.py#sha256=aa"
    parse_once(api, sess, uri, workflow("wf_one", task("a")), workflow("wf_two", task("a")))
    resp = api.client.post(
        "/v1/supervisor/deleted-files", json={"uris": ["file:///w/pair.py"]}, headers=bearer(sess)
    )
    assert resp.status_code == 200, resp.text
    assert current(api, "wf_one")[2] is False and current(api, "wf_two")[2] is False
    parse_once(api, sess, uri, workflow("wf_one", task("a")))
    assert current(api, "wf_one")[2] is True and current(api, "wf_two")[2] is False
    assert len(versions(api, "wf_one")) == 1 and len(versions(api, "wf_two")) == 1


def answer(api: ApiHarness, sess: str, job_id: str, *definitions: dict[str, Any]) -> None:
    """Claim the queued job ``job_id`` and answer it with ``definitions``."""
    (job,) = api.claim(sess, ["parse"], 1)
    assert job.id == job_id
    resp = api.client.post(
        "/v1/parse/result", json={"workflows": list(definitions)}, headers=bearer(job.token)
    )
    assert resp.status_code == 200, resp.text


def parse_errors(api: ApiHarness) -> list[tuple[str, str]]:
    with api.state.db.read_session() as session:
        rows = session.execute(select(ParseError.file_path, ParseError.message)).all()
    return [(row[0], row[1]) for row in rows]


def test_a_file_may_declare_only_the_workflows_the_manifest_gives_it(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    parse_once(api, sess, "file:///w/payroll.py#sha256=01", workflow("payroll", task("pay")))
    owner = current(api, "payroll")
    # A file the manifest gives "etl" also declares "payroll", the other team's workflow.
    job_id = queue(api, sess, "file:///w/etl.py#sha256=02", workflow_ids=["etl"])
    assert job_row(api, job_id)["workflow_ids"] == ["etl"]
    answer(api, sess, job_id, workflow("etl", task("a")), workflow("payroll", task("steal")))
    assert job_row(api, job_id)["state"] == ParseJobState.FAILED
    assert current(api, "payroll") == owner and len(versions(api, "payroll")) == 1
    assert versions(api, "etl") == []  # refused whole: nothing from the file is stored
    ((path, message),) = parse_errors(api)
    assert path == "file:///w/etl.py"
    assert "declares workflow 'payroll', which manifest.json does not assign" in message
    # The same file, declaring only what it was given, is stored.
    job_id = queue(api, sess, "file:///w/etl.py#sha256=03", workflow_ids=["etl"])
    answer(api, sess, job_id, workflow("etl", task("a")))
    assert job_row(api, job_id)["state"] == ParseJobState.SUCCESS
    assert current(api, "etl")[1:] == ("file:///w/etl.py", True)


def test_a_file_the_manifest_does_not_list_may_declare_no_workflow(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    helper = queue(api, sess, "file:///w/helpers.py#sha256=04", workflow_ids=[])
    answer(api, sess, helper)  # a module of shared code: nothing declared, nothing refused
    assert job_row(api, helper)["state"] == ParseJobState.SUCCESS
    stray = queue(api, sess, "file:///w/stray.py#sha256=05", workflow_ids=[])
    answer(api, sess, stray, workflow("stray", task("a")), workflow("other", task("a")))
    assert job_row(api, stray)["state"] == ParseJobState.FAILED
    ((_, message),) = parse_errors(api)
    assert "declares workflow 'other' (and 1 more)" in message
    assert versions(api, "stray") == [] and versions(api, "other") == []
    # Without a manifest (no workflow_ids), any id goes, as before.
    parse_once(api, sess, "file:///w/stray.py#sha256=05", workflow("stray", task("a")))
    assert current(api, "stray")[2] is True


@pytest.mark.parametrize("ids", [["no spaces"], [""], "etl", ["x"] * 1001])
def test_malformed_workflow_ids_are_refused_when_queued(api: ApiHarness, ids: Any) -> None:
    sess = api.supervisor_session("sup-a")
    resp = api.client.post(
        "/v1/supervisor/parse-jobs",
        json={"uri": "file:///w/a.py", "workflow_ids": ids},
        headers=bearer(sess),
    )
    assert resp.status_code == 422, resp.text


def test_a_bad_definition_is_refused_before_the_job_ends(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    job_id = queue(api, sess, "file:///w/bad.py")
    (job,) = api.claim(sess, ["parse"])
    resp = api.client.post(
        "/v1/parse/result",
        json={"workflows": [workflow("wf_bad", task("a", "missing"))]},
        headers=bearer(job.token),
    )
    assert resp.status_code == 400 and error_code(resp) == "invalid_definition"
    with api.state.db.read_session() as session:
        assert session.get(Workflow, "wf_bad") is None
    assert job_row(api, job_id)["state"] == ParseJobState.RUNNING


# --- many files at once ----------------------------------------------------------------------


def queued(api: ApiHarness) -> list[tuple[str, str, str | None, str]]:
    with api.state.db.read_session() as session:
        return [
            (job.id, job.uri, job.content_hash, job.bundle_version)
            for job in session.scalars(select(ParseJob).order_by(ParseJob.created_at, ParseJob.id))
        ]


def test_a_batch_queues_every_job_in_one_request(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    jobs = [
        {"uri": f"file:///w/f{n}.py#sha256={n:064x}", "content_hash": f"{n:064x}"} for n in range(5)
    ]
    jobs[2]["bundle_version"] = "v7"
    resp = api.client.post(
        "/v1/supervisor/parse-jobs/batch", json={"jobs": jobs}, headers=bearer(sess)
    )
    assert resp.status_code == 200, resp.text
    ids = resp.json()["ids"]
    assert len(set(ids)) == 5
    rows = {job_id: (uri, digest, bundle) for job_id, uri, digest, bundle in queued(api)}
    assert [rows[job_id] for job_id in ids] == [
        (j["uri"], j["content_hash"], j.get("bundle_version", "")) for j in jobs
    ]
    assert sorted(w.id for w in api.claim(sess, ["parse"], 10)) == sorted(ids)


@pytest.mark.parametrize(
    "jobs",
    [
        [{"uri": "file:///w/ok.py"}, {"uri": ""}],  # one bad job refuses the whole batch
        [{"uri": f"file:///w/{n}.py"} for n in range(1001)],  # over the limit
        [],
    ],
    ids=["one-bad-job", "too-many", "empty"],
)
def test_a_refused_batch_queues_nothing(api: ApiHarness, jobs: list[dict[str, str]]) -> None:
    sess = api.supervisor_session("sup-a")
    resp = api.client.post(
        "/v1/supervisor/parse-jobs/batch", json={"jobs": jobs}, headers=bearer(sess)
    )
    assert resp.status_code == 422, resp.text
    assert queued(api) == []


def test_only_a_supervisor_may_queue_a_batch(api: ApiHarness) -> None:
    sess = api.supervisor_session("sup-a")
    queue(api, sess, "file:///w/p.py")
    (job,) = api.claim(sess, ["parse"], 1)
    body = {"jobs": [{"uri": "file:///w/x.py"}, {"uri": "file:///w/y.py"}]}
    for headers in ({}, bearer(job.token), bearer(api.operator_session())):
        resp = api.client.post("/v1/supervisor/parse-jobs/batch", json=body, headers=headers)
        assert resp.status_code == 401, resp.text
    assert [uri for _, uri, _, _ in queued(api)] == ["file:///w/p.py"]
