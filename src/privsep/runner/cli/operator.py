"""The operator commands: ``runner workflows|runs|tasks|variables|connections|policy``.

They talk to the server's operator API (``/v1/operator``) over HTTP as the holder of the
operator credential (``operator.credential``), the same way a supervisor does with its own:
a fresh single-use assertion signed by the long-lived Ed25519 key buys a short session token.
The token lives in this process's memory only; nothing about the session is written to disk,
so there is no token file to steal or to leave behind.

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
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from privsep.runner.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CommandError

if TYPE_CHECKING:
    import requests
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from privsep.runner.config.loader import Config

Handler = Callable[[argparse.Namespace], int]

# Assertions are single-use and short; 30 s is plenty for one round trip.
ASSERTION_TTL = 30
# Open a new session when less than this many seconds of the current one are left, so a
# request never leaves with a token that expires on the way.
RENEW_MARGIN = 30.0
# How often `runs trigger --wait` asks for the run's state.
WAIT_POLL_SECONDS = 1.0
FINAL_RUN_STATES = frozenset({"success", "failed"})
MASK = "***"
SECRET_FIELDS = ("password", "extra")


# --- the client ------------------------------------------------------------------------------


class OperatorClient:
    """Calls the operator API with a session opened from the operator credential.

    The key file is read (permission-checked) on the first call, not at construction, so
    building a client never fails and commands that fail earlier never touch the key. A 401 on
    a call opens one new session and retries once: a session can expire during a long
    ``--wait``, and a restarted server may have rotated its signing keys.
    """

    def __init__(self, url: str, credential: str, *, timeout: float = 10.0) -> None:
        # The configured URL is also the assertion's audience, which the server compares with
        # its own server.url verbatim; only the request base is normalised.
        self.url = url
        self.base = url.rstrip("/")
        self.credential = credential
        self.timeout = timeout
        self._http: requests.Session | None = None
        self._token = ""
        self._expires_at = 0.0

    @classmethod
    def from_config(cls, cfg: Config) -> OperatorClient:
        return cls(str(cfg.get("server.url")), str(cfg.path_of("operator.credential")))

    def __repr__(self) -> str:  # the token never reaches a log through repr()
        return f"OperatorClient(url={self.url!r}, credential={self.credential!r})"

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        self._token = ""

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- sessions ---------------------------------------------------------------------------

    def _load_key(self) -> Ed25519PrivateKey:
        """The operator key, or a one-line error that says how to get a usable one."""
        from privsep.secrets.files import InsecureFileError
        from privsep.secrets.keys import KeyFormatError, load_private_key

        path = self.credential
        try:
            return load_private_key(path)
        except FileNotFoundError:
            raise CommandError(
                f"no operator credential at {path}: create one with "
                f"`runner credentials create --out {path}` and point "
                "server.operator_public_key at its .pub (or set operator.credential)"
            ) from None
        except InsecureFileError as exc:
            raise CommandError(f"refusing to use the operator credential: {exc}") from None
        except KeyFormatError as exc:
            raise CommandError(f"unusable operator credential {exc}") from None
        except OSError as exc:
            raise CommandError(
                f"cannot read the operator credential {path}: {exc.strerror or exc}"
            ) from None

    def _open_session(self) -> None:
        from privsep.secrets.tokens import create_assertion

        key = self._load_key()
        assertion = create_assertion(
            key, supervisor_name="operator", audience=self.url, ttl_seconds=ASSERTION_TTL
        )
        status, body = self._send("POST", "/v1/operator/session", {"assertion": assertion}, None)
        if status == 200 and isinstance(body, dict) and isinstance(body.get("token"), str):
            self._token = body["token"]
            self._expires_at = float(body.get("expires_at", 0))
            return
        code, message = _error_of(status, body)
        where = f"cannot open an operator session with the server at {self.url}"
        if code == "no_operator_key":
            raise CommandError(
                f"{where}: {message} (create a credential with `runner credentials create "
                f"--out {self.credential}` and point server.operator_public_key at its .pub, "
                "then restart `runner server`)"
            )
        if code == "bad_audience":
            raise CommandError(
                f"{where}: {message} (server.url here must be the server's own server.url)"
            )
        if status == 401:
            raise CommandError(
                f"{where}: the server refused the credential {self.credential}: {message} "
                "(is server.operator_public_key the .pub of this key?)"
            )
        raise CommandError(f"{where}: {_status_text(status, message)}")

    def _session_token(self) -> str:
        if not self._token or self._expires_at - time.time() < RENEW_MARGIN:
            self._open_session()
        return self._token

    # --- calls ------------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        missing_ok: bool = False,
    ) -> Any:
        """One authenticated call; the parsed JSON body on success.

        ``what`` completes "cannot ..." in the error message (``"trigger workflow 'etl'"``).
        With ``missing_ok`` a 404 returns None instead of failing.
        """
        status, data = self._send(method, path, body, self._session_token(), params)
        if status == 401:
            self._token = ""
            status, data = self._send(method, path, body, self._session_token(), params)
        if 200 <= status < 300:
            return data
        if status == 404 and missing_ok:
            return None
        _, message = _error_of(status, data)
        if status == 401:
            raise CommandError(f"cannot {what}: the server refused the operator session: {message}")
        if status == 403:
            raise CommandError(f"cannot {what}: forbidden: {message}")
        if status in (400, 422):
            raise CommandError(f"cannot {what}: the server rejected the request: {message}")
        if status in (404, 409):
            raise CommandError(f"cannot {what}: {message}")
        raise CommandError(f"cannot {what}: {_status_text(status, message)}")

    def _send(
        self,
        method: str,
        path: str,
        body: Any,
        token: str | None,
        params: dict[str, Any] | None = None,
    ) -> tuple[int, Any]:
        """One HTTP exchange; network failures become the "cannot reach" error here."""
        import requests

        if self._http is None:
            self._http = requests.Session()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            resp = self._http.request(
                method,
                self.base + path,
                json=body,
                params=params,
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,  # a token is sent to the configured server only
            )
        except requests.Timeout:
            raise CommandError(
                f"the server at {self.url} did not answer {method} {path} within "
                f"{self.timeout:g} s (is `runner server` overloaded or stuck?)"
            ) from None
        except requests.RequestException as exc:
            raise CommandError(
                f"cannot reach the server at {self.url}: {_network_reason(exc)} "
                "(is `runner server` running? check server.url)"
            ) from None
        try:
            data = resp.json() if resp.content else None
        except ValueError:
            data = None
        return resp.status_code, data


def _error_of(status: int, body: Any) -> tuple[str, str]:
    """The server's ``{"code", "message"}``, or stand-ins when the body is not ours."""
    if isinstance(body, dict):
        return str(body.get("code", "error")), one_line(str(body.get("message", "")))
    return "error", f"HTTP {status} without an error body"


def _status_text(status: int, message: str) -> str:
    if status >= 500:
        return f"the server failed (HTTP {status}): {message} (see the `runner server` log)"
    return f"HTTP {status}: {message}"


_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def _network_reason(exc: Exception) -> str:
    """The OS's reason inside requests' nested exception text ("Connection refused")."""
    found = _ERRNO_TEXT.search(str(exc))
    if found:
        return found.group(1).strip()
    text = str(exc)
    for marker in ("Name or service not known", "No route to host", "Connection refused"):
        if marker in text:
            return marker
    return type(exc).__name__


def _client(args: argparse.Namespace) -> OperatorClient:
    from privsep.runner.config.loader import load_config

    return OperatorClient.from_config(load_config(args.config))


def _seg(value: str) -> str:
    """One URL path segment; ``.`` and ``..`` are encoded so no layer resolves them."""
    encoded = quote(value, safe="")
    return encoded.replace(".", "%2E") if set(value) <= {"."} else encoded


# --- output ----------------------------------------------------------------------------------


def _escape_char(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` safe for a terminal: control and format characters (escape sequences, bidi
    overrides) are shown as ``\\x1b``-style escapes."""
    out = []
    for ch in text:
        if keep_newlines and ch == "\n":
            out.append(ch)
        elif ch == "\t":
            out.append("    ")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(_escape_char(ch))
        else:
            out.append(ch)
    return "".join(out)


def one_line(text: str, limit: int = 500) -> str:
    """A message for a one-line error: newlines folded, controls escaped, length bounded."""
    flat = " ".join(text.split())
    flat = clean(flat)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def mask_secrets(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of a connection record with ``password`` and ``extra`` masked if set.

    The server masks them already; this makes "never printed" hold even if it did not.
    """
    return {k: (MASK if k in SECRET_FIELDS and v is not None else v) for k, v in record.items()}


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return one_line(str(value), limit=200)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        print(f"{key + ':':<{width + 1}}  {_cell(value)}")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def when(value: Any) -> str | None:
    """An ISO timestamp from the server as ``2024-05-01 12:00:03`` (UTC, seconds)."""
    moment = _parse_time(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else None


def duration_seconds(started: Any, ended: Any) -> float | None:
    """Seconds between two server timestamps; None unless both are known."""
    start, end = _parse_time(started), _parse_time(ended)
    if start is None or end is None:
        return None
    return round(max(0.0, (end - start).total_seconds()), 3)


def format_duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


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


def cmd_workflows_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.call("GET", "/v1/operator/workflows", what="list workflows")
    if args.json:
        emit_json(data)
        return EXIT_OK
    workflows = data["workflows"]
    if not workflows:
        print("no workflows (none parsed yet? see `runner workflows errors`)")
        return EXIT_OK
    print_table(
        ("workflow", "active", "version", "bundle", "schedule", "tasks"),
        [
            (
                w["id"],
                w["active"],
                w["current_version_id"],
                w["bundle_version"] or None,
                w["schedule"],
                w["task_count"],
            )
            for w in workflows
        ],
    )
    return EXIT_OK


def cmd_workflows_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.call(
            "GET",
            f"/v1/operator/workflows/{_seg(args.workflow)}",
            what=f"show workflow {args.workflow!r}",
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
    with _client(args) as client:
        data = client.call(
            "GET",
            "/v1/operator/parse-errors",
            params={"limit": args.limit},
            what="list parse errors",
        )
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
    run = client.call("GET", f"/v1/operator/runs/{_seg(run_id)}", what=f"show run {run_id!r}")
    attempts = client.call(
        "GET",
        f"/v1/operator/runs/{_seg(run_id)}/attempts",
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
            f"/v1/operator/workflows/{_seg(args.workflow)}/runs",
            body={"conf": conf},
            what=f"trigger workflow {args.workflow!r}",
        )
        if not args.wait:
            if args.json:
                emit_json(run)
            else:
                print(
                    f"triggered run {run['id']} of workflow {run['workflow_id']} ({run['state']})"
                )
            return EXIT_OK
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
        run = client.call("GET", f"/v1/operator/runs/{_seg(run_id)}", what=f"follow run {run_id!r}")
        if run["state"] in FINAL_RUN_STATES:
            return _run_with_attempts(client, run_id)
        if deadline is not None and time.monotonic() >= deadline:
            raise CommandError(
                f"run {run_id} is still {run['state']} after {timeout:g} s; stopped waiting "
                f"(the run goes on: `runner runs show {run_id}`)"
            )
        time.sleep(WAIT_POLL_SECONDS)


def cmd_runs_list(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.workflow:
        params["workflow_id"] = args.workflow
    with _client(args) as client:
        data = client.call("GET", "/v1/operator/runs", params=params, what="list runs")
    if args.json:
        emit_json(data)
        return EXIT_OK
    runs = data["runs"]
    if not runs:
        print("no runs")
        return EXIT_OK
    print_table(
        ("run", "workflow", "state", "created", "ended"),
        [
            (r["id"], r["workflow_id"], r["state"], when(r["created_at"]), when(r["ended_at"]))
            for r in runs
        ],
    )
    return EXIT_OK


def cmd_runs_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        run = _run_with_attempts(client, args.run)
    if args.json:
        emit_json(run)
    else:
        _print_run(run)
    return EXIT_OK


def cmd_tasks_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.call(
            "GET",
            f"/v1/operator/runs/{_seg(args.run)}/attempts",
            what=f"list the task attempts of run {args.run!r}",
        )
    attempts = _attempt_rows(data["attempts"])
    if args.json:
        emit_json({"run_id": args.run, "attempts": attempts})
    else:
        _print_attempts(attempts)
    return EXIT_OK


# --- variables -------------------------------------------------------------------------------


def cmd_variables_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.call(
            "GET", f"/v1/operator/variables/{_seg(args.key)}", what=f"get variable {args.key!r}"
        )
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
    with _client(args) as client:
        client.call(
            "PUT",
            f"/v1/operator/variables/{_seg(args.key)}",
            body=body,
            what=f"set variable {args.key!r}",
        )
    if args.json:
        emit_json({"key": args.key, "description": args.description, "set": True})
    else:
        print(f"set variable {args.key}")
    return EXIT_OK


def cmd_variables_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.call(
            "DELETE",
            f"/v1/operator/variables/{_seg(args.key)}",
            what=f"delete variable {args.key!r}",
        )
    if args.json:
        emit_json({"key": args.key, "deleted": True})
    else:
        print(f"deleted variable {args.key}")
    return EXIT_OK


def cmd_variables_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.call("GET", "/v1/operator/variables", what="list variables")
    if args.json:
        emit_json(data)
        return EXIT_OK
    if not data["variables"]:
        print("no variables")
        return EXIT_OK
    print_table(("key", "description"), [(v["key"], v["description"]) for v in data["variables"]])
    return EXIT_OK


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
    path = f"/v1/operator/connections/{_seg(args.conn_id)}"
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
    with _client(args) as client:
        conn = client.call(
            "GET",
            f"/v1/operator/connections/{_seg(args.conn_id)}",
            what=f"get connection {args.conn_id!r}",
        )
    if args.json:
        emit_json(mask_secrets(conn))
    else:
        _print_connection(conn)
    return EXIT_OK


def cmd_connections_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.call(
            "DELETE",
            f"/v1/operator/connections/{_seg(args.conn_id)}",
            what=f"delete connection {args.conn_id!r}",
        )
    if args.json:
        emit_json({"conn_id": args.conn_id, "deleted": True})
    else:
        print(f"deleted connection {args.conn_id}")
    return EXIT_OK


def cmd_connections_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.call("GET", "/v1/operator/connections", what="list connections")
    connections = [mask_secrets(c) for c in data["connections"]]
    if args.json:
        emit_json({"connections": connections})
        return EXIT_OK
    if not connections:
        print("no connections")
        return EXIT_OK
    print_table(
        ("connection", "type", "host", "port", "login", "password", "extra"),
        [
            (
                c["conn_id"],
                c["conn_type"],
                c["host"],
                c["port"],
                c["login"],
                c["password"],
                c["extra"],
            )
            for c in connections
        ],
    )
    return EXIT_OK


# --- policy ----------------------------------------------------------------------------------


def _grant_text(grant: dict[str, Any]) -> str:
    return (
        f"workflows matching {grant['workflow_pattern']!r} may read "
        f"{grant['kind']}s matching {grant['name_pattern']!r}"
    )


def cmd_policy_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.call("GET", "/v1/operator/policy", what="show the policy")
    if args.json:
        emit_json(data)
        return EXIT_OK
    if not data["grants"]:
        print("no grants: no workflow may read any variable or connection")
        return EXIT_OK
    print_table(
        ("id", "workflows", "kind", "names"),
        [(g["id"], g["workflow_pattern"], g["kind"], g["name_pattern"]) for g in data["grants"]],
    )
    return EXIT_OK


def cmd_policy_grant(args: argparse.Namespace) -> int:
    body = {
        "workflow_pattern": args.workflow_pattern,
        "kind": args.kind,
        "name_pattern": args.name_pattern,
    }
    with _client(args) as client:
        grant = client.call(
            "POST",
            "/v1/operator/policy",
            body=body,
            what=f"grant {args.kind} {args.name_pattern!r} to {args.workflow_pattern!r}",
        )
    if args.json:
        emit_json(grant)
    else:
        print(f"granted #{grant['id']}: {_grant_text(grant)}")
    return EXIT_OK


def cmd_policy_revoke(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.call(
            "DELETE", f"/v1/operator/policy/{args.grant_id}", what=f"revoke grant #{args.grant_id}"
        )
    if args.json:
        emit_json({"id": args.grant_id, "revoked": True})
    else:
        print(f"revoked grant #{args.grant_id}")
    return EXIT_OK


# --- the parser ------------------------------------------------------------------------------


def _limit(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 1 <= number <= 1000:
        raise argparse.ArgumentTypeError("must be between 1 and 1000")
    return number


def _port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a port number (0-65535)")
    return number


def _group(sub: Any, name: str, help_text: str) -> Any:
    parser = sub.add_parser(name, help=help_text)
    actions = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION")
    actions.required = True
    return actions


def _action(group: Any, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(name, help=help_text)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=handler)
    return parser


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``workflows``, ``runs``, ``tasks``, ``variables``, ``connections`` and ``policy``
    to the ``runner`` parser (``runner logs`` lives in cli.py: it reads local files)."""
    g = _group(sub, "workflows", "parsed workflows and definition-file errors")
    _action(g, "list", "every workflow: active, version, schedule, tasks", cmd_workflows_list)
    p = _action(g, "show", "one workflow's current definition", cmd_workflows_show)
    p.add_argument("workflow", metavar="WORKFLOW")
    p = _action(
        g, "errors", "import errors of definition files, newest first", cmd_workflows_errors
    )
    p.add_argument("--limit", type=_limit, default=50, metavar="N", help="at most N (default 50)")

    g = _group(sub, "runs", "trigger and inspect runs")
    p = _action(g, "trigger", "start a run of a workflow now", cmd_runs_trigger)
    p.add_argument("workflow", metavar="WORKFLOW")
    p.add_argument("--conf", metavar="JSON", help="run configuration, a JSON object")
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the run to end; exit 0 if it succeeded, 1 if it failed",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --wait: give up waiting after this long, exit 1 (default: no limit)",
    )
    p = _action(g, "list", "recent runs, newest first", cmd_runs_list)
    p.add_argument("--workflow", metavar="WORKFLOW", help="only this workflow's runs")
    p.add_argument("--limit", type=_limit, default=50, metavar="N", help="at most N (default 50)")
    p = _action(g, "show", "one run and its task attempts", cmd_runs_show)
    p.add_argument("run", metavar="RUN")

    g = _group(sub, "tasks", "task attempts")
    p = _action(g, "list", "the attempts of a run: task, try, state, duration", cmd_tasks_list)
    p.add_argument("run", metavar="RUN")

    g = _group(sub, "variables", "operator-managed variables")
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

    g = _group(sub, "connections", "connections (passwords and extras are never shown)")
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

    g = _group(sub, "policy", "which workflows may read which variables and connections")
    _action(g, "show", "every grant", cmd_policy_show)
    p = _action(g, "grant", "let matching workflows read matching names", cmd_policy_grant)
    p.add_argument("workflow_pattern", metavar="WORKFLOW_PATTERN", help="glob, e.g. 'etl_*'")
    p.add_argument("kind", choices=("variable", "connection"))
    p.add_argument("name_pattern", metavar="NAME_PATTERN", help="glob, e.g. 'warehouse'")
    p = _action(g, "revoke", "delete a grant by id (see `runner policy show`)", cmd_policy_revoke)
    p.add_argument("grant_id", metavar="ID", type=int)
