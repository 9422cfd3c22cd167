"""The sandbox routes, declared from the rows of the sandbox surface
(:mod:`privsep.client._surface`): each row's method and path become its FastAPI route, and the
row's scope names the one principal dependency the route must take, so a route cannot be
declared at another path or with another scope's check than its row says."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Final, TypeVar

from fastapi import APIRouter
from fastapi.params import Depends

from privsep.client._surface import BY_NAME, PARSE, TASK, TRIGGER, Route
from privsep.server.auth import parse_principal, task_token, trigger_principal

F = TypeVar("F", bound=Callable[..., Any])

PRINCIPALS: Final[dict[str, Callable[..., Any]]] = {
    TASK: task_token,
    PARSE: parse_principal,
    TRIGGER: trigger_principal,
}
"""The dependency that checks a token of each sandbox scope (and only of that scope)."""

ENDPOINTS: dict[Route, Callable[..., Any]] = {}
"""Each row's FastAPI endpoint, filled as the route modules are imported."""


def _principals_in(endpoint: Callable[..., Any]) -> list[Callable[..., Any]]:
    """The sandbox principal dependencies among ``endpoint``'s parameters, and among those of
    the dependencies it takes (a route may take the principal inside a bundle)."""
    found: list[Callable[..., Any]] = []
    for parameter in inspect.signature(endpoint).parameters.values():
        if not isinstance(parameter.default, Depends) or parameter.default.dependency is None:
            continue
        dependency = parameter.default.dependency
        found += [dependency] if dependency in PRINCIPALS.values() else _principals_in(dependency)
    return found


def _principal_of(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """The one sandbox principal dependency that ``endpoint`` takes."""
    found = _principals_in(endpoint)
    if len(found) != 1:
        raise TypeError(f"{endpoint.__qualname__} must take exactly one sandbox principal")
    return found[0]


def sandbox_route(router: APIRouter, name: str) -> Callable[[F], F]:
    """Declare ``endpoint`` as the route of row ``name`` on ``router`` (whose prefix is part
    of the row's path). Raises at import if the endpoint checks another scope's token."""
    row = BY_NAME[name]
    if not row.path.startswith(router.prefix + "/"):
        raise ValueError(f"row {name} ({row.path}) is not under {router.prefix}")

    def declare(endpoint: F) -> F:
        if _principal_of(endpoint) is not PRINCIPALS[row.scope]:
            raise TypeError(f"{endpoint.__qualname__} does not check a {row.scope} token")
        router.add_api_route(row.path.removeprefix(router.prefix), endpoint, methods=[row.method])
        ENDPOINTS[row] = endpoint
        return endpoint

    return declare
