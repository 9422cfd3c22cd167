"""Who may define a workflow, on both databases: the supervisor that reported a file first
owns it and the workflows it defines; without a manifest, the first file keeps a workflow id
while it is there; with one, the manifest may move a workflow between its own files.

The attack through a real ``runner server`` and ``runner supervisor`` is in
``tests/security/test_discovery_ownership.py``; these cover the rules on PostgreSQL too.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from privsep.server.db.models import AuditLog, Workflow

from .api import ApiHarness, bearer, error_code, task, workflow


def queue(api: ApiHarness, sess: str, uri: str, ids: list[str] | None = None) -> Any:
    body: dict[str, Any] = {"uri": uri}
    if ids is not None:
        body["workflow_ids"] = ids
    return api.client.post("/v1/supervisor/parse-jobs", json=body, headers=bearer(sess))


def parse(api: ApiHarness, sess: str, uri: str, workflow_id: str, ids: list[str] | None) -> None:
    """Queue ``uri`` as ``sess``'s supervisor, claim it and report it declaring
    ``workflow_id``."""
    assert queue(api, sess, uri, ids).status_code == 200
    (job,) = api.claim(sess, ["parse"], 1)
    resp = api.client.post(
        "/v1/parse/result",
        json={"workflows": [workflow(workflow_id, task("t"))]},
        headers=bearer(job.token),
    )
    assert resp.status_code == 200, resp.text


def row(api: ApiHarness, workflow_id: str) -> tuple[str | None, bool, str | None]:
    with api.state.db.read_session() as session:
        wf = session.get(Workflow, workflow_id)
        assert wf is not None
        return wf.source_uri, wf.active, wf.supervisor_id


def errors(api: ApiHarness) -> dict[str, str]:
    resp = api.client.get("/v1/operator/parse-errors", headers=bearer(api.operator_session()))
    return {e["file_path"]: e["message"] for e in resp.json()["errors"]}


def test_another_supervisors_file_and_workflow_are_refused(api: ApiHarness) -> None:
    a, b = api.supervisor_session("sup-a"), api.supervisor_session("sup-b")
    parse(api, a, "file:///a/payroll.py#sha256=" + "a" * 64, "payroll", ["payroll"])
    before = row(api, "payroll")
    assert before[:2] == ("file:///a/payroll.py", True)

    resp = queue(api, b, "file:///a/payroll.py#sha256=" + "b" * 64)
    assert resp.status_code == 403 and error_code(resp) == "not_owner"
    assert "reported first by supervisor 'sup-a'" in resp.json()["message"]
    resp = queue(api, b, "file:///b/payroll.py", ["payroll"])
    assert resp.status_code == 403 and error_code(resp) == "not_owner"
    resp = api.client.post(
        "/v1/supervisor/deleted-files", json={"uris": ["file:///a/payroll.py"]}, headers=bearer(b)
    )
    assert resp.status_code == 403 and error_code(resp) == "not_owner"
    # B's own file, no ids named: the result is what is refused.
    parse(api, b, "file:///b/sneaky.py", "payroll", None)
    assert "declares workflow 'payroll'" in errors(api)["file:///b/sneaky.py"]
    assert row(api, "payroll") == before

    with api.state.db.read_session() as session:
        denied = session.scalars(
            select(AuditLog.detail).where(
                AuditLog.event == "request_denied", AuditLog.actor == "sup-b"
            )
        ).all()
    assert [d["code"] for d in denied] == ["not_owner"] * 3


def test_a_manifest_moves_a_workflow_between_its_own_files(api: ApiHarness) -> None:
    a = api.supervisor_session("sup-a")
    parse(api, a, "file:///a/old.py", "etl", ["etl"])
    parse(api, a, "file:///a/new.py", "etl", ["etl"])
    assert row(api, "etl")[:2] == ("file:///a/new.py", True)


def test_without_a_manifest_the_first_file_keeps_the_id_while_it_is_there(
    api: ApiHarness,
) -> None:
    a = api.supervisor_session("sup-a")
    parse(api, a, "file:///a/first.py", "dup", None)
    parse(api, a, "file:///a/second.py", "dup", None)
    message = errors(api)["file:///a/second.py"]
    assert "file:///a/first.py already declares" in message and "file:///a/second.py" in message
    assert row(api, "dup")[:2] == ("file:///a/first.py", True)
    # A duplicate's deletion changes nothing.
    resp = api.client.post(
        "/v1/supervisor/deleted-files", json={"uris": ["file:///a/second.py"]}, headers=bearer(a)
    )
    assert resp.status_code == 200
    assert row(api, "dup")[:2] == ("file:///a/first.py", True)
    # A renamed file: once the old one is gone, the new one takes the id.
    resp = api.client.post(
        "/v1/supervisor/deleted-files", json={"uris": ["file:///a/first.py"]}, headers=bearer(a)
    )
    assert resp.status_code == 200 and row(api, "dup")[1] is False
    parse(api, a, "file:///a/renamed.py", "dup", None)
    assert row(api, "dup")[:2] == ("file:///a/renamed.py", True)
