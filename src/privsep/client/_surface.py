"""The sandbox surface: every API route a parse, trigger or task sandbox may call, declared once.

One row per route, as OpenSSH's monitor keeps one ``{type, flags, handler}`` row per request
(``mon_dispatch_postauth20``): the method and path, the token scope the server demands, and
three flags. Everything that decides what a sandbox may reach is derived from :data:`ROUTES`:

* ``PROXY``: the supervisor forwards the call for a child without network
  (:func:`privsep.client._wire.check_proxy_path`); a call that matches no ``PROXY`` row is a
  protocol violation, and the supervisor closes the connection.
* ``REPORT``: a 2xx answer means the server has ended the work item, so the supervisor owes no
  outcome of its own for it (:data:`REPORT_CALLS`).
* ``FAST``: the server's fast path (``privsep.server.fastpath``) may answer it without FastAPI,
  after the same checks as the route.

The scope is enforced by the server: each row's FastAPI route is declared from the row, with
the principal dependency of the row's scope (``privsep.server.routes._surface``), and a test
walks the application to prove that every sandbox route has a row and refuses other scopes.

This module is imported by the client SDK, the supervisor and the server alike, so it uses
only the standard library.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final

TASK: Final = "task"
PARSE: Final = "parse"
TRIGGER: Final = "trigger"
SCOPES: Final = frozenset({TASK, PARSE, TRIGGER})
"""The token scopes a sandbox is ever given; each route accepts exactly one of them."""

PREFIXES: Final = {TASK: "/v1/task/", PARSE: "/v1/parse/", TRIGGER: "/v1/trigger/"}
"""Where each scope's routes live; a row's path must start with its scope's prefix."""


class Flag(enum.Flag):
    """What may happen to a call on a row besides the server's own check."""

    NONE = 0
    PROXY = enum.auto()
    REPORT = enum.auto()
    FAST = enum.auto()


PROXY, REPORT, FAST = Flag.PROXY, Flag.REPORT, Flag.FAST

_PARAM = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class Route:
    """One row: ``name`` is the server's handler for it, ``path`` a template whose ``{name}``
    parts each match one non-empty path segment (as FastAPI's do)."""

    name: str
    method: str
    path: str
    scope: str
    flags: Flag = Flag.NONE
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.path.startswith(PREFIXES.get(self.scope, "/v1/")):
            raise ValueError(f"route {self.name}: {self.path} is outside its scope's prefix")
        parts = _PARAM.split(self.path)  # literal, name, literal, name, ..., literal
        regex = "".join(
            re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts)
        )
        object.__setattr__(self, "pattern", re.compile(regex))

    def match(self, method: str, path: str) -> dict[str, str] | None:
        """The path parameters if ``method path`` is a call on this row, else ``None``."""
        if method != self.method:
            return None
        found = self.pattern.fullmatch(path)
        return found.groupdict() if found is not None else None


# Why each row is safe, over each row. The server checks every call's token (signature,
# expiry, audience, the row's scope) and that its work item is still running under the
# supervisor that claimed it; the reasons below are what each route adds to that.
ROUTES: Final[tuple[Route, ...]] = (
    # Reads only the token's own attempt (run, task, try, params, trigger event).
    Route("task.context", "GET", "/v1/task/context", TASK, PROXY | FAST),
    # Writes one timestamp on the token's own attempt, only while it runs with that try.
    Route("task.heartbeat", "POST", "/v1/task/heartbeat", TASK, PROXY | FAST),
    # Ends only the token's own attempt, in one conditional write; its return value becomes
    # an XCom of its own task in its own run.
    Route("task.succeed", "POST", "/v1/task/succeed", TASK, PROXY | REPORT | FAST),
    # Ends only the token's own attempt; retries follow the task's definition, not the body.
    Route("task.fail", "POST", "/v1/task/fail", TASK, PROXY | REPORT),
    # As fail: the number of tries left is the server's, never the caller's.
    Route("task.retry", "POST", "/v1/task/retry", TASK, PROXY | REPORT),
    # Parks only the token's own attempt on a trigger; the trigger later runs in a sandbox
    # of its own with a token of its own, so deferring gains the task no privilege.
    Route("task.defer", "POST", "/v1/task/defer", TASK, PROXY | REPORT),
    # A variable is read only when operator policy grants it to the attempt's workflow.
    Route("task.variable", "GET", "/v1/task/variables/{key}", TASK, PROXY | FAST),
    # Written and deleted under the same policy grant as the read.
    Route("task.set_variable", "PUT", "/v1/task/variables/{key}", TASK, PROXY),
    Route("task.delete_variable", "DELETE", "/v1/task/variables/{key}", TASK, PROXY),
    # Decrypted only when policy grants the connection to the attempt's workflow.
    Route("task.connection", "GET", "/v1/task/connections/{conn_id}", TASK, PROXY),
    # Writes an XCom of the token's own task in its own run: the path cannot name another.
    Route("task.push_xcom", "PUT", "/v1/task/xcoms/{key}", TASK, PROXY),
    # Reads any task's XCom, but only within the token's own run.
    Route("task.pull_xcom", "GET", "/v1/task/xcoms/{task_id}/{key}", TASK, PROXY | FAST),
    # Ends only the token's own parse job, in one conditional write; a file that declares a
    # workflow its manifest entry does not assign to it has nothing stored.
    Route("parse.result", "POST", "/v1/parse/result", PARSE, PROXY | REPORT | FAST),
    # Lists only the triggers the token names that still run under its supervisor.
    Route("trigger.assigned", "GET", "/v1/trigger/assigned", TRIGGER, PROXY),
    # Fires or fails only a trigger the token names; it resumes or fails only the deferred
    # attempt that trigger belongs to.
    Route("trigger.event", "POST", "/v1/trigger/{trigger_id}/event", TRIGGER, PROXY),
    Route("trigger.failure", "POST", "/v1/trigger/{trigger_id}/failure", TRIGGER, PROXY),
)

if any(route.scope not in SCOPES for route in ROUTES):
    raise ValueError("a row of the sandbox surface takes a scope no sandbox is given")

BY_NAME: Final = {route.name: route for route in ROUTES}

REPORT_CALLS: Final = frozenset(
    (route.method, route.path) for route in ROUTES if REPORT in route.flags
)
"""``(method, path)`` of each call that reports its work item's end (none has parameters)."""


def find(method: str, path: str, flag: Flag = Flag.NONE) -> tuple[Route, dict[str, str]] | None:
    """The row (carrying ``flag``) that ``method path`` calls, and its path parameters."""
    for route in ROUTES:
        if flag in route.flags:
            params = route.match(method, path)
            if params is not None:
                return route, params
    return None
