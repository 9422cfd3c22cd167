"""The operator commands: ``runner workflows|runs|tasks|variables|connections|policy``.

They talk to the server's operator API (``/v1/operator``) over HTTP as the holder of the
operator credential (``operator.credential``), the same way a supervisor does with its own
(:mod:`privsep.runner.cli.operator_client`). What they print for people is in
:mod:`privsep.runner.cli.output`.

Output rules, shared by every command:

* ``--json`` prints one JSON document on stdout; without it, a table or a few lines for people.
* A failure is one line on stderr and a non-zero exit status (through :class:`CommandError`):
  what was attempted, on what, then the server's or the OS's reason, and a hint when there is
  an obvious next step.
* Connection secrets are never printed. The server already answers ``"***"`` for them; the
  printers mask them again, so a server bug cannot put a password on a terminal. A password
  is never taken from the command line either (``ps`` and shell history would keep it): it
  comes from stdin or from a file.
* Text that workflow code controls (parse errors, task errors) may hold terminal escape
  sequences; human output shows control characters escaped, never raw.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from privsep.runner.cli.operator_client import OperatorClient, seg
from privsep.runner.cli.output import (
    clean,
    duration_seconds,
    emit_json,
    format_duration,
    mask_secrets,
    one_line,
    print_fields,
    print_table,
    when,
)
from privsep.runner.cli.parsers import Handler, action, group, seconds_option
from privsep.runner.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CommandError

# How often `runs trigger --wait` asks for the run's state.
WAIT_POLL_SECONDS = 1.0
FINAL_RUN_STATES = frozenset({"success", "failed"})


def _client(args: argparse.Namespace) -> OperatorClient:
    from privsep.runner.config.loader import load_config

    return OperatorClient.from_config(load_config(args.config))


def _get(args: argparse.Namespace, path: str, what: str, **params: Any) -> Any:
    """The answer to one GET, for the commands that make only that call."""
    with _client(args) as client:
        return client.call("GET", path, what=what, params=params or None)


def _change(args: argparse.Namespace, method: str, path: str, what: str, body: Any = None) -> Any:
    """The answer to one call that changes something, for the commands that make only that."""
    with _client(args) as client:
        return client.call(method, path, what=what, body=body)


def _done(args: argparse.Namespace, record: Any, text: str) -> int:
    """A command's outcome: ``record`` with ``--json``, else ``text`` for people."""
    if args.json:
        emit_json(record)
    else:
        print(text)
    return EXIT_OK


@dataclass(frozen=True)
class _Listing:
    """A list command as data: what it fetches, and the table it prints. Every list command
    behaves the same (``--json`` prints what the API sent, an empty list prints ``none``), so
    they differ only here."""

    path: str
    what: str
    key: str  # the list in the API's answer
    none: str
    headers: tuple[str, ...]
    row: Callable[[Any], Sequence[Any]]
    params: Callable[[argparse.Namespace], dict[str, Any]] = lambda args: {}
    # Applied to each item before anything is shown, ``--json`` included (masking secrets).
    item: Callable[[Any], Any] | None = None


def _list_command(listing: _Listing) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        data = _get(args, listing.path, listing.what, **listing.params(args))
        items = data[listing.key]
        if listing.item is not None:
            items = [listing.item(i) for i in items]
            data = {listing.key: items}
        if args.json:
            emit_json(data)
        elif not items:
            print(listing.none)
        else:
            print_table(listing.headers, [listing.row(i) for i in items])
        return EXIT_OK

    return handler


def _loads_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"{what} is not valid JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(value, dict):
        raise CommandError(f"{what} must be a JSON object, not {type(value).__name__}", EXIT_USAGE)
    return value


def _read_text(path: str, what: str) -> str:
    """A file's text for an option; ``-`` is stdin. The content is never echoed in errors."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise CommandError(
            f"cannot read {what} {path}: {exc.strerror or exc}", EXIT_USAGE
        ) from None
    except UnicodeDecodeError:
        raise CommandError(f"cannot read {what} {path}: not UTF-8 text", EXIT_USAGE) from None


def _strip_newline(text: str) -> str:
    """Drop the one line ending ``echo`` or an editor adds; keep any other whitespace."""
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


# --- workflows -------------------------------------------------------------------------------


cmd_workflows_list = _list_command(
    _Listing(
        "/v1/operator/workflows",
        "list workflows",
        "workflows",
        "no workflows (none parsed yet? see `runner workflows errors`)",
        ("workflow", "active", "version", "bundle", "schedule", "tasks"),
        lambda w: (
            w["id"],
            w["active"],
            w["current_version_id"],
            w["bundle_version"] or None,
            w["schedule"],
            w["task_count"],
        ),
    )
)


def cmd_workflows_show(args: argparse.Namespace) -> int:
    data = _get(
        args, f"/v1/operator/workflows/{seg(args.workflow)}", f"show workflow {args.workflow!r}"
    )
    if args.json:
        emit_json(data)
        return EXIT_OK
    definition = data.get("definition") or {}
    print_fields(
        [
            ("workflow", data["id"]),
            ("active", data["active"]),
            ("version", data["current_version_id"]),
            ("bundle", data["bundle_version"] or None),
            ("parsed", when(data["parsed_at"])),
            ("source", data["source_uri"]),
            ("schedule", definition.get("schedule")),
        ]
    )
    tasks = definition.get("tasks") or []
    if tasks:
        print()
        print_table(
            ("task", "upstream", "retries", "timeout", "callable"),
            [
                (
                    t.get("task_id"),
                    ", ".join(t.get("upstream") or []) or None,
                    t.get("retries"),
                    t.get("timeout"),
                    f"{t.get('module')}:{t.get('qualname')}",
                )
                for t in tasks
            ],
        )
    return EXIT_OK


def cmd_workflows_errors(args: argparse.Namespace) -> int:
    data = _get(args, "/v1/operator/parse-errors", "list parse errors", limit=args.limit)
    if args.json:
        emit_json(data)
        return EXIT_OK
    errors = data["errors"]
    if not errors:
        print("no parse errors")
        return EXIT_OK
    for n, err in enumerate(errors):
        if n:
            print()
        print(f"{when(err['created_at'])}  {clean(err['file_path'])}")
        for line in clean(err["message"], keep_newlines=True).rstrip("\n").splitlines():
            print(f"    {line}")
    return EXIT_OK


# --- runs and tasks --------------------------------------------------------------------------


def _attempt_rows(attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Attempts with their duration in seconds added (None while running or never started)."""
    return [
        {**a, "duration_seconds": duration_seconds(a.get("started_at"), a.get("ended_at"))}
        for a in attempts
    ]


def _print_attempts(attempts: list[dict[str, Any]]) -> None:
    if not attempts:
        print("no task attempts yet")
        return
    print_table(
        ("task", "try", "state", "duration", "attempt"),
        [
            (
                a["task_id"],
                a["try_number"],
                a["state"],
                format_duration(a["duration_seconds"]),
                a["id"],
            )
            for a in attempts
        ],
    )
    for a in attempts:
        if a.get("error") and a["state"] in ("failed", "up_for_retry"):
            print(f"  {a['task_id']} try {a['try_number']}: {error_summary(a['error'])}")


def _run_with_attempts(client: OperatorClient, run_id: str) -> dict[str, Any]:
    run = client.call("GET", f"/v1/operator/runs/{seg(run_id)}", what=f"show run {run_id!r}")
    attempts = client.call(
        "GET",
        f"/v1/operator/runs/{seg(run_id)}/attempts",
        what=f"list the task attempts of run {run_id!r}",
    )
    return {**run, "attempts": _attempt_rows(attempts["attempts"])}


def _print_run(run: dict[str, Any]) -> None:
    print_fields(
        [
            ("run", run["id"]),
            ("workflow", run["workflow_id"]),
            ("state", run["state"]),
            ("trigger", run["trigger_kind"]),
            ("created", when(run["created_at"])),
            ("started", when(run["started_at"])),
            ("ended", when(run["ended_at"])),
            ("duration", format_duration(duration_seconds(run["started_at"], run["ended_at"]))),
            ("conf", json.dumps(run["conf"]) if run["conf"] else None),
        ]
    )
    print()
    _print_attempts(run["attempts"])


def error_summary(error: str | None) -> str:
    """A task error in one line: its last non-blank line, which for a Python traceback is the
    exception itself (``RuntimeError: boom``); the whole text is in `runner logs` and --json."""
    lines = [line for line in (error or "").splitlines() if line.strip()]
    return one_line(lines[-1], 200) if lines else ""


def _failure_reason(run: dict[str, Any]) -> str:
    """Why a run failed, in one line: its first failed task and that task's error."""
    for a in run["attempts"]:
        if a["state"] == "failed":
            error = error_summary(a.get("error"))
            tail = f": {error}" if error else ""
            return f"task {a['task_id']!r} failed on try {a['try_number']}{tail}"
    return "no task failed (see `runner runs show`)"


def cmd_runs_trigger(args: argparse.Namespace) -> int:
    conf = _loads_object(args.conf, "--conf") if args.conf is not None else {}
    with _client(args) as client:
        run = client.call(
            "POST",
            f"/v1/operator/workflows/{seg(args.workflow)}/runs",
            body={"conf": conf},
            what=f"trigger workflow {args.workflow!r}",
        )
        if not args.wait:
            text = f"triggered run {run['id']} of workflow {run['workflow_id']} ({run['state']})"
            return _done(args, run, text)
        if not args.json:
            print(
                f"triggered run {run['id']} of workflow {run['workflow_id']}; waiting for it to end"
            )
            sys.stdout.flush()
        final = _wait_for(client, run["id"], args.timeout)
    if args.json:
        emit_json(final)
    else:
        print()
        _print_run(final)
    if final["state"] == "success":
        return EXIT_OK
    raise CommandError(
        f"run {final['id']} of workflow {final['workflow_id']!r} failed: {_failure_reason(final)}",
        EXIT_FAILURE,
    )


def _wait_for(client: OperatorClient, run_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout if timeout > 0 else None
    while True:
        run = client.call("GET", f"/v1/operator/runs/{seg(run_id)}", what=f"follow run {run_id!r}")
        if run["state"] in FINAL_RUN_STATES:
            return _run_with_attempts(client, run_id)
        if deadline is not None and time.monotonic() >= deadline:
            raise CommandError(
                f"run {run_id} is still {run['state']} after {timeout:g} s; stopped waiting "
                f"(the run goes on: `runner runs show {run_id}`)"
            )
        time.sleep(WAIT_POLL_SECONDS)


cmd_runs_list = _list_command(
    _Listing(
        "/v1/operator/runs",
        "list runs",
        "runs",
        "no runs",
        ("run", "workflow", "state", "created", "ended"),
        lambda r: (
            r["id"],
            r["workflow_id"],
            r["state"],
            when(r["created_at"]),
            when(r["ended_at"]),
        ),
        params=lambda args: {"limit": args.limit, "workflow_id": args.workflow or None},
    )
)


def cmd_runs_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        run = _run_with_attempts(client, args.run)
    if args.json:
        emit_json(run)
    else:
        _print_run(run)
    return EXIT_OK


def cmd_tasks_list(args: argparse.Namespace) -> int:
    data = _get(
        args,
        f"/v1/operator/runs/{seg(args.run)}/attempts",
        f"list the task attempts of run {args.run!r}",
    )
    attempts = _attempt_rows(data["attempts"])
    if args.json:
        emit_json({"run_id": args.run, "attempts": attempts})
    else:
        _print_attempts(attempts)
    return EXIT_OK


# --- variables -------------------------------------------------------------------------------


def cmd_variables_get(args: argparse.Namespace) -> int:
    data = _get(args, f"/v1/operator/variables/{seg(args.key)}", f"get variable {args.key!r}")
    if args.json:
        emit_json(data)
    else:
        print(data["value"])  # as stored: this is what scripts capture with $(...)
    return EXIT_OK


def cmd_variables_set(args: argparse.Namespace) -> int:
    if (args.value is None) == (args.value_file is None):
        raise CommandError("give the value either as VALUE or with --value-file", EXIT_USAGE)
    value = (
        args.value
        if args.value is not None
        else _strip_newline(_read_text(args.value_file, "--value-file"))
    )
    body = {"value": value, "description": args.description}
    _change(
        args, "PUT", f"/v1/operator/variables/{seg(args.key)}", f"set variable {args.key!r}", body
    )
    record = {"key": args.key, "description": args.description, "set": True}
    return _done(args, record, f"set variable {args.key}")


def cmd_variables_delete(args: argparse.Namespace) -> int:
    path = f"/v1/operator/variables/{seg(args.key)}"
    _change(args, "DELETE", path, f"delete variable {args.key!r}")
    return _done(args, {"key": args.key, "deleted": True}, f"deleted variable {args.key}")


cmd_variables_list = _list_command(
    _Listing(
        "/v1/operator/variables",
        "list variables",
        "variables",
        "no variables",
        ("key", "description"),
        lambda v: (v["key"], v["description"]),
    )
)


# --- connections -----------------------------------------------------------------------------


def _read_password(args: argparse.Namespace) -> str | None:
    """The password from stdin or a file, never from argv (``ps``, shell history)."""
    if args.password_file is not None:
        password = _strip_newline(_read_text(args.password_file, "--password-file"))
    elif args.password_stdin:
        if sys.stdin.isatty():
            import getpass

            password = getpass.getpass(f"password for connection {args.conn_id}: ")
        else:
            password = _strip_newline(sys.stdin.read())
    else:
        return None
    if not password:
        raise CommandError("the password is empty (nothing was read)", EXIT_USAGE)
    return password


def _print_connection(conn: dict[str, Any]) -> None:
    conn = mask_secrets(conn)
    print_fields(
        [
            ("connection", conn["conn_id"]),
            ("type", conn["conn_type"]),
            ("host", conn["host"]),
            ("port", conn["port"]),
            ("login", conn["login"]),
            ("password", conn["password"]),
            ("schema", conn["schema"]),
            ("extra", conn["extra"]),
            ("description", conn["description"]),
        ]
    )


def cmd_connections_add(args: argparse.Namespace) -> int:
    password = _read_password(args)
    extra = None
    if args.extra_file is not None:
        extra = _read_text(args.extra_file, "--extra-file")
        _loads_object(extra, f"--extra-file {args.extra_file}")  # says nothing of the content
    path = f"/v1/operator/connections/{seg(args.conn_id)}"
    body = {
        "conn_type": args.conn_type,
        "host": args.host,
        "port": args.port,
        "login": args.login,
        "password": password,
        "schema": args.schema,
        "extra": extra,
        "description": args.description,
    }
    with _client(args) as client:
        if not args.replace:
            existing = client.call(
                "GET", path, what=f"look up connection {args.conn_id!r}", missing_ok=True
            )
            if existing is not None:
                raise CommandError(
                    f"connection {args.conn_id!r} exists already; pass --replace to overwrite "
                    "it (all its fields, the password too)"
                )
        client.call("PUT", path, body=body, what=f"store connection {args.conn_id!r}")
        stored = client.call("GET", path, what=f"read back connection {args.conn_id!r}")
    if args.json:
        emit_json(mask_secrets(stored))
    else:
        print(f"stored connection {args.conn_id}")
        _print_connection(stored)
    return EXIT_OK


def cmd_connections_get(args: argparse.Namespace) -> int:
    conn = _get(
        args, f"/v1/operator/connections/{seg(args.conn_id)}", f"get connection {args.conn_id!r}"
    )
    if args.json:
        emit_json(mask_secrets(conn))
    else:
        _print_connection(conn)
    return EXIT_OK


def cmd_connections_delete(args: argparse.Namespace) -> int:
    path = f"/v1/operator/connections/{seg(args.conn_id)}"
    _change(args, "DELETE", path, f"delete connection {args.conn_id!r}")
    record = {"conn_id": args.conn_id, "deleted": True}
    return _done(args, record, f"deleted connection {args.conn_id}")


_CONNECTION_COLUMNS = ("conn_id", "conn_type", "host", "port", "login", "password", "extra")
cmd_connections_list = _list_command(
    _Listing(
        "/v1/operator/connections",
        "list connections",
        "connections",
        "no connections",
        ("connection", "type", "host", "port", "login", "password", "extra"),
        lambda c: [c[k] for k in _CONNECTION_COLUMNS],
        item=mask_secrets,
    )
)


# --- policy ----------------------------------------------------------------------------------


def _grant_text(grant: dict[str, Any]) -> str:
    return (
        f"workflows matching {grant['workflow_pattern']!r} may read "
        f"{grant['kind']}s matching {grant['name_pattern']!r}"
    )


cmd_policy_show = _list_command(
    _Listing(
        "/v1/operator/policy",
        "show the policy",
        "grants",
        "no grants: no workflow may read any variable or connection",
        ("id", "workflows", "kind", "names"),
        lambda g: (g["id"], g["workflow_pattern"], g["kind"], g["name_pattern"]),
    )
)


def cmd_policy_grant(args: argparse.Namespace) -> int:
    body = {
        "workflow_pattern": args.workflow_pattern,
        "kind": args.kind,
        "name_pattern": args.name_pattern,
    }
    what = f"grant {args.kind} {args.name_pattern!r} to {args.workflow_pattern!r}"
    grant = _change(args, "POST", "/v1/operator/policy", what, body)
    return _done(args, grant, f"granted #{grant['id']}: {_grant_text(grant)}")


def cmd_policy_revoke(args: argparse.Namespace) -> int:
    path = f"/v1/operator/policy/{args.grant_id}"
    _change(args, "DELETE", path, f"revoke grant #{args.grant_id}")
    record = {"id": args.grant_id, "revoked": True}
    return _done(args, record, f"revoked grant #{args.grant_id}")


# --- the parser ------------------------------------------------------------------------------


def _number(value: str, low: int, high: int, noun: str, out_of_range: str) -> int:
    """``value`` as a whole number from ``low`` to ``high``; argparse shows a refusal as a
    usage error. ``out_of_range`` may name the ``{number}``."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not {noun}") from None
    if not low <= number <= high:
        raise argparse.ArgumentTypeError(out_of_range.format(number=number))
    return number


def _limit(value: str) -> int:
    return _number(value, 1, 1000, "a whole number", "must be between 1 and 1000")


def _port(value: str) -> int:
    return _number(value, 0, 65535, "a port number", "{number} is not a port number (0-65535)")


def _action(sub: Any, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
    return action(sub, name, help_text, handler, json=True)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``workflows``, ``runs``, ``tasks``, ``variables``, ``connections`` and ``policy``
    to the ``runner`` parser (``runner logs`` lives in cli.py: it reads local files)."""
    g = group(sub, "workflows", "parsed workflows and definition-file errors")
    _action(g, "list", "every workflow: active, version, schedule, tasks", cmd_workflows_list)
    p = _action(g, "show", "one workflow's current definition", cmd_workflows_show)
    p.add_argument("workflow", metavar="WORKFLOW")
    p = _action(
        g, "errors", "import errors of definition files, newest first", cmd_workflows_errors
    )
    p.add_argument("--limit", type=_limit, default=50, metavar="N", help="at most N (default 50)")

    g = group(sub, "runs", "trigger and inspect runs")
    p = _action(g, "trigger", "start a run of a workflow now", cmd_runs_trigger)
    p.add_argument("workflow", metavar="WORKFLOW")
    p.add_argument("--conf", metavar="JSON", help="run configuration, a JSON object")
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the run to end; exit 0 if it succeeded, 1 if it failed",
    )
    seconds_option(
        p, "--timeout", "with --wait: give up waiting after this long, exit 1 (default: no limit)"
    )
    p = _action(g, "list", "recent runs, newest first", cmd_runs_list)
    p.add_argument("--workflow", metavar="WORKFLOW", help="only this workflow's runs")
    p.add_argument("--limit", type=_limit, default=50, metavar="N", help="at most N (default 50)")
    p = _action(g, "show", "one run and its task attempts", cmd_runs_show)
    p.add_argument("run", metavar="RUN")

    g = group(sub, "tasks", "task attempts")
    p = _action(g, "list", "the attempts of a run: task, try, state, duration", cmd_tasks_list)
    p.add_argument("run", metavar="RUN")

    g = group(sub, "variables", "operator-managed variables")
    p = _action(g, "get", "print a variable's value", cmd_variables_get)
    p.add_argument("key", metavar="KEY")
    p = _action(g, "set", "create or overwrite a variable", cmd_variables_set)
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE", nargs="?")
    p.add_argument("--value-file", metavar="PATH", help="read the value from PATH ('-': stdin)")
    p.add_argument("--description", metavar="TEXT")
    p = _action(g, "delete", "delete a variable", cmd_variables_delete)
    p.add_argument("key", metavar="KEY")
    _action(g, "list", "variable names and descriptions (not values)", cmd_variables_list)

    g = group(sub, "connections", "connections (passwords and extras are never shown)")
    p = _action(
        g, "add", "store a connection; its secrets are encrypted at rest", cmd_connections_add
    )
    p.add_argument("conn_id", metavar="CONN_ID")
    p.add_argument("--type", dest="conn_type", required=True, metavar="TYPE")
    p.add_argument("--host")
    p.add_argument("--port", type=_port)
    p.add_argument("--login")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from stdin (prompt without echo on a terminal)",
    )
    secret.add_argument("--password-file", metavar="PATH", help="read the password from PATH")
    p.add_argument("--schema")
    p.add_argument("--extra-file", metavar="PATH", help="a JSON object of extra settings")
    p.add_argument("--description", metavar="TEXT")
    p.add_argument("--replace", action="store_true", help="overwrite an existing connection")
    p = _action(g, "get", "one connection, secrets masked", cmd_connections_get)
    p.add_argument("conn_id", metavar="CONN_ID")
    p = _action(g, "delete", "delete a connection", cmd_connections_delete)
    p.add_argument("conn_id", metavar="CONN_ID")
    _action(g, "list", "every connection, secrets masked", cmd_connections_list)

    g = group(sub, "policy", "which workflows may read which variables and connections")
    _action(g, "show", "every grant", cmd_policy_show)
    p = _action(g, "grant", "let matching workflows read matching names", cmd_policy_grant)
    p.add_argument("workflow_pattern", metavar="WORKFLOW_PATTERN", help="glob, e.g. 'etl_*'")
    p.add_argument("kind", choices=("variable", "connection"))
    p.add_argument("name_pattern", metavar="NAME_PATTERN", help="glob, e.g. 'warehouse'")
    p = _action(g, "revoke", "delete a grant by id (see `runner policy show`)", cmd_policy_revoke)
    p.add_argument("grant_id", metavar="ID", type=int)
