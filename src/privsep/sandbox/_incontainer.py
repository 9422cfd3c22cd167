"""The container backend's PID 1: read the launch plan, report "ready", call the entry point.

The container backend starts ``python3 -I -m privsep.sandbox._incontainer PLAN STATUS`` in the
sandbox image, as the pool uid, in the sandbox's work directory. Docker has done the isolating
(see ``container``); what is left for this module is what ``_child.run`` does after
``enter()``, for the same reasons:

* ``PLAN`` is a JSON file the backend wrote into the work dir (entry point, argv, payload,
  environment). It is read and unlinked before any user code runs, so user code cannot read
  another launch's plan, and the payload never appears in ``docker inspect`` as a command-line
  argument or an environment variable would.
* ``STATUS`` is a FIFO in the work dir whose read end the backend holds. The ``F`` (setup
  failed) or ``R`` (ready) record goes there, in ``_wire``'s framing; the FIFO is unlinked as
  soon as it is open and closed before user code runs, so user code cannot forge a record.
* The environment is replaced by the plan's (Docker adds ``PATH`` and ``HOSTNAME`` of its own).
* PID 1 ignores ``SIGTERM`` unless it has a handler, so it gets one that exits 143.

This module runs inside the image: it may import only the standard library and the sandbox
files the image carries (``privsep.sandbox.image``).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import signal
import sys
from typing import Any, NoReturn

from privsep.sandbox._exit import call_and_exit
from privsep.sandbox._steps import SetupStep, fail, load_entry_point
from privsep.sandbox._wire import CREDENTIAL_SOCKET_ENV, READY, forbidden_env, write_record

PLAN_NAME = ".privsep-plan"
STATUS_NAME = ".privsep-status"
MAX_PLAN = 64 << 20


def _open_status(path: str) -> int:
    # Non-blocking so a missing reader fails (ENXIO) instead of hanging PID 1 for good.
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    os.set_blocking(fd, True)
    os.unlink(path)
    return fd


def _read_plan(path: str) -> dict[str, Any]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.unlink(path)
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > MAX_PLAN:
                raise ValueError(f"launch plan larger than {MAX_PLAN} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)
    plan = json.loads(b"".join(chunks))
    if not isinstance(plan, dict):
        raise ValueError("launch plan is not an object")
    for key, kind in (("entry", str), ("argv", list), ("payload", str), ("env", dict)):
        if not isinstance(plan.get(key), kind):
            raise ValueError(f"launch plan field {key!r} is missing or not a {kind.__name__}")
    return plan


def _apply_environment(env: dict[str, Any], socket_path: object) -> None:
    os.environ.clear()
    for name, value in env.items():
        if not isinstance(value, str) or forbidden_env(name):
            raise ValueError(f"refusing to pass {name} into a sandbox")
        os.environ[name] = value
    if isinstance(socket_path, str):
        os.environ[CREDENTIAL_SOCKET_ENV] = socket_path


def _terminate(signum: int, _frame: object) -> None:
    """PID 1 ignores SIGTERM without a handler; turn it into a clean interpreter exit."""
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> NoReturn:
    """``python3 -I -m privsep.sandbox._incontainer PLAN STATUS``."""
    signal.signal(signal.SIGTERM, _terminate)
    os.umask(0o022)
    if len(argv) != 3:
        fail(
            -1, SetupStep.BOOTSTRAP, "usage: python3 -I -m privsep.sandbox._incontainer PLAN STATUS"
        )
    try:
        status_fd = _open_status(argv[2])
    except OSError as exc:
        fail(-1, SetupStep.BOOTSTRAP, f"cannot open the status FIFO {argv[2]}: {exc}")
    try:
        plan = _read_plan(argv[1])
        payload = base64.b64decode(plan["payload"], validate=True)
        args = [str(a) for a in plan["argv"]]
    except (OSError, ValueError, binascii.Error) as exc:
        fail(status_fd, SetupStep.BOOTSTRAP, f"cannot read the launch plan: {exc}")
    try:
        _apply_environment(plan["env"], plan.get("socket"))
    except ValueError as exc:
        fail(status_fd, SetupStep.ENVIRONMENT, str(exc))
    entry = load_entry_point(plan["entry"], status_fd)
    try:
        write_record(status_fd, READY)
    finally:
        os.close(status_fd)
    sys.argv = [plan["entry"], *args]
    call_and_exit(lambda: entry(args, payload))


if __name__ == "__main__":
    main(sys.argv)
