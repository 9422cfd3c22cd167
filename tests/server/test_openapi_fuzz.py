"""Schemathesis against the served OpenAPI document: no 5xx, and every response conforms.

Two runs over every operation. Without auth: every route answers (401, 403, 404, 422 and the
like for the protected ones) and nothing crashes. With auth: each generated case carries a
fresh credential of the scope its route expects (an operator or supervisor session, a task
token of a running attempt, a parse token of a running job, a trigger token of a running
batch), so the fuzzing reaches past authentication into the handlers and the database. Each
run prints how many examples it ran per token kind, and a kind that ran none fails the test:
a run that generated nothing must not pass. Example counts are kept low so the whole file
stays within about a minute.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
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

    def kind_of(self, path: str) -> str:
        """Which token kind a route takes, by its prefix."""
        for prefix, kind in (
            ("/v1/task/", "task"),
            ("/v1/parse/", "parse"),
            ("/v1/trigger/", "trigger"),
            ("/v1/operator/", "operator"),
            ("/v1/health", "operator"),  # an operator session gets the detailed answer
        ):
            if path.startswith(prefix):
                return kind
        return "supervisor"

    def for_path(self, path: str) -> dict[str, str]:
        kind = self.kind_of(path)
        if kind == "task":
            return bearer(self._task_token())
        if kind == "parse":
            self.api.client.post(
                "/v1/supervisor/parse-jobs",
                json={"uri": "file:///x.py"},
                headers=bearer(self.session),
            )
            (job,) = self.api.claim(self.session, ["parse"], 1)
            return bearer(job.token)
        if kind == "trigger":
            # A deferred task makes a trigger; claiming it hands out a batch's token.
            resp = self.api.client.post(
                "/v1/task/defer",
                json={"trigger": {"module": "workflows.etl", "qualname": "Sleep", "kwargs": {}}},
                headers=bearer(self._task_token()),
            )
            assert resp.status_code == 200, resp.text
            (batch,) = self.api.claim(self.session, ["trigger"], 1)
            return bearer(batch.token)
        if kind == "operator":
            return bearer(self.operator)
        return bearer(self.session)

    def _task_token(self) -> str:
        self.api.trigger_run(self.operator, "wf")
        (work,) = self.api.claim(self.session, ["task"], 1)
        return work.token


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Credentials]:
    tmp = tmp_path_factory.mktemp("fuzz")
    url = sqlite_url_for(tmp / "privsep.db")
    upgrade(url)
    db = Database.from_url(url)
    yield Credentials(ApiHarness(db, tmp))
    db.dispose()


def _fuzz(
    credentials: Credentials,
    headers_for: Callable[[str], dict[str, str]],
    max_examples: int,
) -> tuple[Counter[str], dict[str, set[int]]]:
    """Every operation, ``max_examples`` generated cases each, in-process against the real app;
    returns the examples run per token kind and the statuses seen per operation.

    Driven with Hypothesis directly: schemathesis' lazy pytest fixture integration does not
    work with the pytest this project pins.
    """
    schema = schemathesis.openapi.from_asgi(
        "/v1/operator/openapi.json", credentials.api.app, headers=bearer(credentials.operator)
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 20
    ran: Counter[str] = Counter()
    statuses: dict[str, set[int]] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            headers = {
                k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"
            }
            headers.update(headers_for(case.path))
            # Semantic refusals (an upstream that names no task) are 400s by design, which
            # schemathesis' "valid data is accepted" check cannot know; every other check runs
            # (no 5xx, status and body conform to the schema).
            response = case.call_and_validate(
                headers=headers, excluded_checks=[positive_data_acceptance]
            )
            ran[credentials.kind_of(case.path)] += 1
            statuses.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

        check()
    return ran, statuses


KINDS = {"operator", "supervisor", "task", "parse", "trigger"}


def test_without_auth_every_route_refuses_cleanly(
    credentials: Credentials, record_property: Callable[[str, object], None]
) -> None:
    ran, statuses = _fuzz(credentials, lambda path: {}, max_examples=8)
    print(f"schemathesis without auth: {sum(ran.values())} examples, by route kind {dict(ran)}")
    record_property("examples_without_auth", dict(ran))  # in the JUnit report CI keeps
    assert set(ran) == KINDS and all(n > 0 for n in ran.values()), ran
    # Only what is meant to be public answered 2xx: health, keys, and the two
    # session exchanges (which refuse a bad assertion with 401/422, never a 2xx).
    public = {"GET /v1/health", "GET /v1/jwks"}
    for operation, seen in statuses.items():
        if operation not in public:
            assert not {s for s in seen if 200 <= s < 300}, (operation, seen)


def test_with_each_token_kind_no_server_errors_and_responses_conform(
    credentials: Credentials, record_property: Callable[[str, object], None]
) -> None:
    ran, statuses = _fuzz(credentials, credentials.for_path, max_examples=12)
    print(f"schemathesis with tokens: {sum(ran.values())} examples, by token kind {dict(ran)}")
    record_property("examples_with_tokens", dict(ran))
    assert set(ran) == KINDS and all(n > 0 for n in ran.values()), ran
    # The fuzzing got past authentication: each kind's routes answered something but 401.
    for kind, prefix in (
        ("task", "/v1/task/"),
        ("parse", "/v1/parse/"),
        ("trigger", "/v1/trigger/"),
    ):
        seen = set().union(*(s for k, s in statuses.items() if f" {prefix}" in k))
        assert seen - {401}, (kind, statuses)
