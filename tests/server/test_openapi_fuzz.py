"""Schemathesis against the served OpenAPI document: no 5xx, and every response conforms.

Each generated case carries a fresh credential of the scope its route expects (a task token
of a running attempt, a parse token of a running job, a supervisor or operator session), so
the fuzzing reaches past authentication into the handlers and the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from privsep.server.db import Database, sqlite_url_for, upgrade

from .api import ApiHarness, bearer, task, workflow


class Credentials:
    """Hands out a live credential for whatever route a case targets."""

    def __init__(self, api: ApiHarness) -> None:
        self.api = api
        api.register_supervisor("sup")
        self.session = api.supervisor_session("sup")
        self.operator = api.operator_session()
        api.define_workflow(self.session, workflow("wf", task("t", retries=1), task("u", "t")))
        for kind in ("variable", "connection"):
            api.client.post(
                "/v1/operator/policy",
                headers=bearer(self.operator),
                json={"workflow_pattern": "*", "kind": kind, "name_pattern": "*"},
            )

    def for_path(self, path: str) -> dict[str, str]:
        if path.startswith("/v1/task/"):
            self.api.trigger_run(self.operator, "wf")
            (work,) = self.api.claim(self.session, ["task"], 1)
            return bearer(work.token)
        if path.startswith("/v1/parse/"):
            self.api.client.post(
                "/v1/supervisor/parse-jobs",
                json={"uri": "file:///x.py"},
                headers=bearer(self.session),
            )
            (job,) = self.api.claim(self.session, ["parse"], 1)
            return bearer(job.token)
        if path.startswith("/v1/operator/"):
            return bearer(self.operator)
        return bearer(self.session)


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Credentials]:
    tmp = tmp_path_factory.mktemp("fuzz")
    url = sqlite_url_for(tmp / "privsep.db")
    upgrade(url)
    db = Database.from_url(url)
    yield Credentials(ApiHarness(db, tmp))
    db.dispose()


def test_no_server_errors_and_responses_conform(credentials: Credentials) -> None:
    """Every operation, 20 generated cases each, in-process against the real app.

    Driven from one test with Hypothesis directly: schemathesis' lazy pytest fixture
    integration does not work with the pytest this project pins.
    """
    schema = schemathesis.openapi.from_asgi("/v1/openapi.json", credentials.api.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 20
    statuses: dict[str, set[int]] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: Any) -> None:
            headers = dict(case.headers or {})
            headers.update(credentials.for_path(case.path))
            # Semantic refusals (an upstream that names no task) are 400s by design, which
            # schemathesis' "valid data is accepted" check cannot know; every other check runs.
            response = case.call_and_validate(
                headers=headers, excluded_checks=[positive_data_acceptance]
            )
            statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

        check()
    # The fuzzing got past authentication: task routes answered something other than 401.
    task_statuses = set().union(*(s for k, s in statuses.items() if " /v1/task/" in k))
    assert task_statuses - {401}, statuses
