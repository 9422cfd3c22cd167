"""What the parse, task and trigger entry points share: exit codes, payloads, error text.

An entry point's exit code says whether privsep itself worked, not whether user code did: a
task that raised, a file that fails to import, a trigger that crashed are all *reported* to
the API and end in exit 0. A non-zero exit means the outcome could not be reported, and the
supervisor reports it instead (``/v1/supervisor/outcome``), naming the cause from
:class:`ExitCode`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from enum import IntEnum
from typing import Any, TypeVar

from privsep.client._client import Client
from privsep.client._exceptions import NotInSandbox

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
MAX_TRACEBACK_LINES = 20
MAX_ERROR_CHARS = 65536
_Parsed = TypeVar("_Parsed")


class ExitCode(IntEnum):
    """Exit codes of the client entry points (below the sandbox's setup codes, 70-84)."""

    OK = 0
    """The outcome was reported to the API (whatever user code did)."""
    BAD_PAYLOAD = 60
    """The supervisor's payload is not what this entry point takes."""
    NOT_IN_SANDBOX = 61
    """``PRIVSEP_CREDENTIAL_SOCKET`` is not set."""
    API_FAILED = 62
    """The API (or the credential socket) failed, so the outcome could not be reported."""
    TERMINATED = 63
    """The sandbox stopped the user code (SIGTERM: its wall-clock limit, usually); the
    supervisor reports the outcome, with the sandbox's reason."""

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    ExitCode.OK: "outcome reported",
    ExitCode.BAD_PAYLOAD: "the entry point's payload is malformed",
    ExitCode.NOT_IN_SANDBOX: "no credential socket (PRIVSEP_CREDENTIAL_SOCKET is not set)",
    ExitCode.API_FAILED: "the outcome could not be reported to the API",
    ExitCode.TERMINATED: "stopped by the sandbox (SIGTERM) while user code ran",
}


class Terminated(BaseException):
    """SIGTERM arrived while user code ran: the sandbox is stopping this process (its
    wall-clock limit, usually). Not user code's own failure, so it is not reported as one.

    A ``BaseException``, like the ``SystemExit`` it replaces, so ``except Exception`` in user
    code does not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """Around user code: SIGTERM raises :class:`Terminated` (the sandbox's own handler would
    raise ``SystemExit(143)``, which looks like user code exiting). Outside the main thread,
    where no handler can be set, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fatal(component: str, message: str) -> None:
    """One line on stderr for the attempt's log: what failed, on what, and why."""
    print(f"privsep {component}: {message}", file=sys.stderr, flush=True)


def decode_payload(payload: bytes) -> dict[str, Any] | None:
    """The JSON object in a sandbox payload, or ``None`` when it is not one."""
    try:
        value = json.loads(payload.decode("utf-8")) if payload else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def bytes_entry(
    run: Callable[[Mapping[str, Any]], int], component: str
) -> Callable[[list[str], bytes], int]:
    """Adapt ``run(payload_dict)`` to the sandbox's ``func(argv, payload_bytes)`` convention."""

    def main(argv: list[str], payload: bytes) -> int:
        decoded = decode_payload(payload)
        if decoded is None:
            fatal(component, "the payload is not a JSON object")
            return ExitCode.BAD_PAYLOAD
        return run(decoded)

    main.__doc__ = f"Sandbox entry point: ``{component}`` with a JSON payload."
    return main


def entry(
    component: str,
    parse: Callable[[Mapping[str, Any]], _Parsed | None],
    needs: str,
    body: Callable[[Client, _Parsed], int],
) -> Callable[[Mapping[str, Any]], int]:
    """An entry point's ``run(payload)``, so every one fails the same way before its own work:
    logging to stderr, the payload checked by ``parse`` (``None`` is refused, with ``needs`` as
    the reason), a :class:`Client` on the credential socket; then ``body`` with both, while the
    client is open. ``run`` takes ``body``'s docstring."""

    def run(payload: Mapping[str, Any]) -> int:
        configure_logging()
        parsed = parse(payload)
        if parsed is None:
            fatal(component, needs)
            return ExitCode.BAD_PAYLOAD
        try:
            client = Client()
        except NotInSandbox as exc:
            fatal(component, str(exc))
            return ExitCode.NOT_IN_SANDBOX
        with client:
            return body(client, parsed)

    run.__doc__ = body.__doc__
    return run


def configure_logging() -> None:
    """Send ``privsep.*`` records (the task's ``ctx.log`` included) to stderr, which the
    supervisor captures into the attempt's log."""
    root = logging.getLogger("privsep")
    if not any(getattr(h, "_privsep_stderr", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._privsep_stderr = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def _ours(filename: str) -> bool:
    return filename.startswith(_PACKAGE_DIR + os.sep) or filename.startswith("<frozen importlib")


def format_user_error(exc: BaseException) -> str:
    """The traceback of an exception from user code, for people: the SDK's own frames and
    the import machinery removed, the last lines kept (that is where the cause is)."""
    te = traceback.TracebackException.from_exception(exc)
    for current in _chain(te):
        current.stack = traceback.StackSummary.from_list(
            [frame for frame in current.stack if not _ours(frame.filename)]
        )
    lines = "".join(te.format()).rstrip("\n").splitlines()
    if len(lines) > MAX_TRACEBACK_LINES:
        lines = ["...", *lines[-MAX_TRACEBACK_LINES:]]
    text = "\n".join(lines)
    return text if len(text) <= MAX_ERROR_CHARS else "..." + text[-(MAX_ERROR_CHARS - 3) :]


def _chain(te: traceback.TracebackException) -> list[traceback.TracebackException]:
    out: list[traceback.TracebackException] = []
    todo: list[traceback.TracebackException | None] = [te]
    while todo:
        current = todo.pop()
        if current is None or any(current is seen for seen in out):
            continue
        out.append(current)
        todo += [current.__cause__, current.__context__]
    return out
