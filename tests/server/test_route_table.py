"""Every sandbox route the application declares has its row in the sandbox surface
(:mod:`privsep.client._surface`), and enforces the scope its row says: each route is called
against the real application with a token of every scope, and only its row's scope gets past
the token check."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from privsep.client._surface import FAST, PROXY, REPORT, ROUTES, Route, find
from privsep.secrets.tokens import SCOPES, issue_token
from privsep.server.app import create_app
from privsep.server.db import Database
from privsep.server.fastpath import CLAIM, HANDLERS
from privsep.server.routes._surface import ENDPOINTS

from .api import ApiHarness, bearer

SANDBOX_PREFIXES = ("/v1/task/", "/v1/parse/", "/v1/trigger/")


def sandbox_routes(app: FastAPI) -> list[tuple[str, str]]:
    """``(method, path)`` of every route the app declares under a sandbox prefix, as its
    OpenAPI document lists them (the public account of what it serves)."""
    return [
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        if path.startswith(SANDBOX_PREFIXES)
        for method in sorted(operations)
    ]


def row_of(method: str, path: str) -> Route | None:
    return next((r for r in ROUTES if (r.method, r.path) == (method, path)), None)


def test_every_sandbox_route_of_the_app_has_its_row_and_every_row_its_route(
    api: ApiHarness,
) -> None:
    declared = {(method, path) for method, path in sandbox_routes(api.app)}
    rows = {(row.method, row.path) for row in ROUTES}
    assert declared - rows == set(), "routes a sandbox may call without a row in the table"
    assert rows - declared == set(), "rows without a route"
    assert set(ENDPOINTS) == set(ROUTES)


def test_a_route_added_without_a_row_is_caught(tmp_path: Path, db: Database) -> None:
    app = create_app(ApiHarness(db, tmp_path).state)
    app.add_api_route("/v1/task/sneaky", lambda: {"ok": True}, methods=["POST"])
    missing = [(m, p) for m, p in sandbox_routes(app) if row_of(m, p) is None]
    assert missing == [("POST", "/v1/task/sneaky")]


def test_the_derived_lists_follow_the_table() -> None:
    fast = {route for route in ROUTES if FAST in route.flags}
    assert {route for route in HANDLERS if route is not CLAIM} == fast
    reports = {(r.method, r.path) for r in ROUTES if REPORT in r.flags}
    assert reports == {
        ("POST", "/v1/task/succeed"),
        ("POST", "/v1/task/fail"),
        ("POST", "/v1/task/retry"),
        ("POST", "/v1/task/defer"),
        ("POST", "/v1/parse/result"),
    }
    from privsep.runner.supervisor.outcomes import REPORT_CALLS

    assert reports == REPORT_CALLS
    for route in ROUTES:
        concrete = re.sub(r"\{[a-z_]+\}", "x", route.path)
        assert find(route.method, concrete, PROXY) == (
            route,
            dict.fromkeys(re.findall(r"\{([a-z_]+)\}", route.path), "x"),
        )


@pytest.fixture
def api(db: Database, tmp_path: Path) -> Iterator[ApiHarness]:
    harness = ApiHarness(db, tmp_path)
    yield harness
    harness.client.close()


def _token(api: ApiHarness, scope: str) -> str:
    """A validly signed token of ``scope`` whose work item does not exist: enough to tell a
    refusal of the scope (``bad_scope``) from a refusal of the item that comes after it."""
    settings = api.state.settings
    extra: dict[str, Any] = {"try": 1, "sup": "no-such-supervisor", "triggers": ["none"]}
    token = issue_token(
        api.state.signer,
        issuer=settings.issuer,
        audience=settings.audience,
        subject="no-such-item",
        scope=scope,  # type: ignore[arg-type]
        ttl_seconds=60,
        extra=extra,
    )
    return token.reveal()


def test_each_route_takes_only_its_rows_scope(api: ApiHarness) -> None:
    routes = sandbox_routes(api.app)
    assert len(routes) == len(ROUTES)
    tokens = {scope: _token(api, scope) for scope in sorted(SCOPES)}
    for method, path in routes:
        row = row_of(method, path)
        assert row is not None, f"{method} {path} has no row"
        url = re.sub(r"\{[a-z_]+\}", "x", path)
        body = {} if method in ("POST", "PUT") else None
        for scope, token in tokens.items():
            resp = api.client.request(method, url, json=body, headers=bearer(token))
            code = resp.json().get("code") if resp.status_code == 401 else None
            if scope == row.scope:
                assert code != "bad_scope", f"{method} {path} refuses its own scope {scope}"
            else:
                assert (resp.status_code, code) == (401, "bad_scope"), (
                    f"{method} {path} ({row.scope}) let a {scope} token past: {resp.text}"
                )
