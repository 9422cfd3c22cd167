"""What each page of ``runner ui`` fetches from the server and shows.

Each page is one or two GETs of the operator API through the operator client; a failure of
the server (unreachable, refused) is shown as its one-line message in an error page, as the
command line would print it. Every value from the server goes through
:func:`~privsep.runner.ui.markup.esc`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from privsep.runner.cli.operator import error_summary
from privsep.runner.cli.operator_client import OperatorClient, seg
from privsep.runner.cli.output import duration_seconds, format_duration, when
from privsep.runner.ui.markup import Html, join, link, table, tag

# How many chunks one request for a log asks for, and how much of a log the first load of
# its page shows (the live tail then goes on from there).
LOG_PAGE = 1000
LOG_SHOWN_CHARS = 4_000_000
AUDIT_SHOWN = 100

DISCOVERY_TEXT = {
    "up_to_date": "up to date",
    "failing": "failing to sync",
    "off": "discovery off",
    None: "not reported",
}


@dataclass(frozen=True)
class Page:
    """An HTML page: its title, its body (markup) and the scripts it needs."""

    title: str
    body: Html
    status: int = 200
    scripts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Json:
    """A JSON answer (the log's live tail polls one)."""

    data: Any
    status: int = 200


View = Callable[[OperatorClient, dict[str, str], dict[str, str]], Page | Json]


def _age(moment: str | None, now: datetime) -> float | None:
    if not moment:
        return None
    try:
        then = datetime.fromisoformat(moment)
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return max(0.0, (now - then).total_seconds())


def _listing(
    title: str,
    path: str,
    key: str,
    row: Callable[[dict[str, Any], dict[str, Any]], dict[str, object]],
    *,
    empty: str,
    params: dict[str, Any] | None = None,
    id_: str = "",
) -> View:
    """A page that is one table of one listing: ``row`` turns each item (and the whole
    answer, for what it says beside the list) into its cells, by column name."""

    def view(client: OperatorClient, _params: dict[str, str], _query: dict[str, str]) -> Page:
        data = client.call("GET", path, what=f"read {path}", params=params)
        rows = [row(item, data) for item in data[key]]
        headers = tuple(rows[0]) if rows else ()
        cells = [tuple(r.values()) for r in rows]
        return Page(title, table(headers, cells, empty=empty, id_=id_ or key))

    return view


def _state(value: str) -> Html:
    return tag("span", value, class_=f"state {value}")


def _run_row(r: dict[str, Any], _: dict[str, Any]) -> dict[str, object]:
    return {
        "run": link(f"/runs/{seg(r['id'])}", r["id"]),
        "workflow": r["workflow_id"],
        "state": _state(r["state"]),
        "created": when(r["created_at"]),
        "ended": when(r["ended_at"]),
        "duration": format_duration(duration_seconds(r["created_at"], r["ended_at"])),
    }


# The newest 100 runs: the server's default page.
runs = _listing("Runs", "/v1/operator/runs", "runs", _run_row, empty="no runs yet")


def _tasks(run_id: str, attempts: list[dict[str, Any]]) -> Html:
    """One row per task: its latest attempt's state and duration, its tries, and a link to
    each try's log."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for attempt in attempts:
        by_task.setdefault(attempt["task_id"], []).append(attempt)
    rows = []
    for task_id, tries in by_task.items():
        tries.sort(key=lambda a: int(a["try_number"]))
        last = tries[-1]
        logs = join(
            (
                link(f"/attempts/{seg(a['id'])}/log?run={seg(run_id)}", f"try {a['try_number']}")
                for a in tries
            ),
            " ",
        )
        failed = last["state"] in ("failed", "up_for_retry") and last.get("error")
        rows.append(
            (
                task_id,
                _state(last["state"]),
                last["try_number"],
                format_duration(duration_seconds(last["started_at"], last["ended_at"])),
                logs,
                error_summary(last["error"]) if failed else "",
            )
        )
    return table(
        ("task", "state", "tries", "duration", "logs", "error"),
        rows,
        empty="no task attempts yet",
        id_="tasks",
    )


def run(client: OperatorClient, params: dict[str, str], query: dict[str, str]) -> Page:
    run_id = params["run_id"]
    found = client.call(
        "GET", f"/v1/operator/runs/{seg(run_id)}", what=f"show run {run_id!r}", missing_ok=True
    )
    if found is None:
        return Page("No such run", tag("p", f"no run {run_id!r}"), 404)
    attempts = client.call(
        "GET",
        f"/v1/operator/runs/{seg(run_id)}/attempts",
        what=f"list the task attempts of run {run_id!r}",
    )["attempts"]
    fields = [
        ("workflow", found["workflow_id"]),
        ("state", _state(found["state"])),
        ("trigger", found["trigger_kind"]),
        ("created", when(found["created_at"])),
        ("started", when(found["started_at"])),
        ("ended", when(found["ended_at"])),
        ("duration", format_duration(duration_seconds(found["started_at"], found["ended_at"]))),
    ]
    facts = tag("dl", join(join((tag("dt", k), tag("dd", v))) for k, v in fields))
    return Page(f"Run {run_id}", join((facts, tag("h2", "Tasks"), _tasks(run_id, attempts))))


def _log_chunks(client: OperatorClient, attempt_id: str, after: int | None) -> Any:
    return client.call(
        "GET",
        f"/v1/operator/attempts/{seg(attempt_id)}/log",
        what=f"read the log of attempt {attempt_id!r}",
        params={"after": after, "limit": LOG_PAGE},
        missing_ok=True,
    )


def attempt_log(client: OperatorClient, params: dict[str, str], query: dict[str, str]) -> Page:
    """The log as far as it goes now; ``tail.js`` then polls :func:`log_tail` for more."""
    attempt_id = params["attempt_id"]
    texts: list[str] = []
    shown = 0
    after: int | None = None
    while True:
        data = _log_chunks(client, attempt_id, after)
        if data is None:
            return Page("No such attempt", tag("p", f"no attempt {attempt_id!r}"), 404)
        for chunk in data["chunks"]:
            texts.append(chunk["text"])
            shown += len(chunk["text"])
        moved = data["next"] != after
        after = int(data["next"])
        if not data["chunks"] or not moved or data["complete"] or shown >= LOG_SHOWN_CHARS:
            break
    back = query.get("run")
    head = [link(f"/runs/{seg(back)}", f"run {back}")] if back else []
    status = "complete" if data["complete"] else "following…"
    pre = tag(
        "pre",
        "".join(texts),
        id="log",
        data_tail=f"/attempts/{seg(attempt_id)}/log.json",
        data_next=str(after),
        data_complete="true" if data["complete"] else "false",
    )
    body = join((*head, tag("p", status, id="log-state"), pre))
    return Page(f"Log of attempt {attempt_id}", body, scripts=("/static/tail.js",))


def log_tail(client: OperatorClient, params: dict[str, str], query: dict[str, str]) -> Json:
    """New chunks after ``after``, for the live tail; the script adds them as text."""
    attempt_id = params["attempt_id"]
    raw = query.get("after", "")
    after = int(raw) if raw.isdigit() else None
    data = _log_chunks(client, attempt_id, after)
    if data is None:
        return Json({"error": f"no attempt {attempt_id!r}"}, 404)
    chunks = [{"seq": c["seq"], "text": c["text"]} for c in data["chunks"]]
    return Json({"chunks": chunks, "next": data["next"], "complete": data["complete"]})


def workflows(client: OperatorClient, params: dict[str, str], query: dict[str, str]) -> Page:
    data = client.call("GET", "/v1/operator/workflows", what="list workflows")
    rows = [
        (
            w["id"],
            "yes" if w["active"] else "no",
            w["bundle_version"],
            w["schedule"],
            w["task_count"],
            w["source_uri"],
        )
        for w in data["workflows"]
    ]
    errors = client.call("GET", "/v1/operator/parse-errors", what="list definition-file errors")
    error_rows = [
        (e["file_path"], e["bundle_version"], when(e["created_at"]), tag("pre", e["message"]))
        for e in errors["errors"]
    ]
    body = join(
        (
            table(
                ("workflow", "active", "bundle version", "schedule", "tasks", "source"),
                rows,
                empty="no workflows yet",
                id_="workflows",
            ),
            tag("h2", "Definition-file errors"),
            table(
                ("file", "bundle version", "at", "error"),
                error_rows,
                empty="no definition-file errors",
                id_="parse-errors",
            ),
        )
    )
    return Page("Workflows", body)


def _heartbeat(s: dict[str, Any], timeout: float, now: datetime) -> Html:
    if not s["active"]:
        return tag("span", f"revoked {when(s['revoked_at']) or ''}".strip(), class_="state failed")
    age = _age(s["last_heartbeat_at"], now)
    if age is None:
        return tag("span", "never", class_="state failed")
    text = f"{format_duration(age)} ago ({when(s['last_heartbeat_at'])})"
    return tag("span", text if age <= timeout else f"stale: {text}", class_="state")


def _supervisor_row(s: dict[str, Any], data: dict[str, Any]) -> dict[str, object]:
    return {
        "supervisor": s["name"],
        "heartbeat": _heartbeat(s, float(data["heartbeat_timeout"]), datetime.now(UTC)),
        "discovery": DISCOVERY_TEXT.get(s["discovery_state"], s["discovery_state"]),
        "discovery error": s["discovery_error"],
        "reported": when(s["discovery_at"]),
        "registered": when(s["registered_at"]),
    }


def _refusal_row(entry: dict[str, Any], _: dict[str, Any]) -> dict[str, object]:
    detail = entry["detail"] or {}
    return {
        "at": when(entry["at"]),
        "reason": detail.get("code"),
        "status": detail.get("status"),
        "path": detail.get("path"),
        "actor": entry["actor"],
        "subject": entry["subject"],
    }


supervisors = _listing(
    "Supervisors", "/v1/operator/supervisors", "supervisors", _supervisor_row, empty="no one"
)
refusals = _listing(
    "Recent refusals",
    "/v1/operator/audit",
    "entries",
    _refusal_row,
    empty="no refusals recorded",
    params={"event": "request_denied", "limit": AUDIT_SHOWN},
    id_="refusals",
)


# Path patterns (on the raw path; each group is one segment, decoded) and their views.
ROUTES: tuple[tuple[re.Pattern[str], View], ...] = tuple(
    (re.compile(pattern), view)
    for pattern, view in (
        (r"/", runs),
        (r"/runs", runs),
        (r"/runs/(?P<run_id>[^/]+)", run),
        (r"/attempts/(?P<attempt_id>[^/]+)/log", attempt_log),
        (r"/attempts/(?P<attempt_id>[^/]+)/log\.json", log_tail),
        (r"/workflows", workflows),
        (r"/supervisors", supervisors),
        (r"/refusals", refusals),
    )
)

NAV = (
    ("/runs", "Runs"),
    ("/workflows", "Workflows"),
    ("/supervisors", "Supervisors"),
    ("/refusals", "Refusals"),
)


def find(path: str) -> tuple[View, dict[str, str]] | None:
    """The view of a raw request path and its decoded parameters; None for no page."""
    for pattern, view in ROUTES:
        match = pattern.fullmatch(path)
        if match:
            return view, {k: unquote(v) for k, v in match.groupdict().items()}
    return None
