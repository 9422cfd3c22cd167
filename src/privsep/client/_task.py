"""The task component: run one task callable for one attempt and report how it ended.

Runs inside a task sandbox. Payload: ``{"path": definition file, "module": ..., "qualname":
...}`` as recorded at parse time (``path`` may be left out when ``module`` is importable).

Steps: ask the API for the attempt's context (run, workflow, task, try, params, trigger
event), import the definition file, find the task (by workflow and task id from the context,
checked against ``module`` and ``qualname``), call it with a :class:`~privsep.client.Context`.
Then exactly one report:

* it returned: ``/v1/task/succeed`` with the value (JSON) as the ``return_value`` XCom;
* it called ``ctx.defer(trigger)``: ``/v1/task/defer``;
* it raised, or the file failed to import, or the value is not JSON: ``/v1/task/retry`` with
  the traceback; the server retries or fails per the task's ``retries``.

Exit 0 once reported; non-zero (:class:`ExitCode`) only when reporting itself failed.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from typing import Any

from privsep.client import _components as kit
from privsep.client._authoring import Context, TaskDeferred, Workflow
from privsep.client._client import Client
from privsep.client._exceptions import PrivsepError
from privsep.client._loader import find_task, load_definitions

__all__ = ["main", "run"]


_CONTEXT_FIELDS = {
    "attempt_id": str,
    "run_id": str,
    "workflow_id": str,
    "task_id": str,
    "try_number": int,
    "params": dict,
}


def _payload_strings(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """Where the task is (``path``/``module``, ``qualname``) and, when the supervisor passed
    it on from the claim, the attempt's ``context``."""
    out: dict[str, Any] = {}
    for name in ("path", "module", "qualname"):
        value = payload.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            return None
        out[name] = value
    if "path" not in out and "module" not in out:
        return None
    context = payload.get("context")
    if context is not None:
        if not isinstance(context, dict) or not all(
            isinstance(context.get(name), kind) for name, kind in _CONTEXT_FIELDS.items()
        ):
            return None
        out["context"] = context
    return out


def _call_task(ctx: Context, where: Mapping[str, Any]) -> Any:
    if "path" in where:
        _, workflows = load_definitions(where["path"])
    else:
        imported = importlib.import_module(where["module"])
        workflows = [v for v in vars(imported).values() if isinstance(v, Workflow)]
    task = find_task(
        workflows,
        workflow_id=ctx.workflow_id,
        task_id=ctx.task_id,
        module=where.get("module"),
        qualname=where.get("qualname"),
    )
    result = task.func(ctx)
    if hasattr(result, "__await__"):  # an ``async def`` task: run it to completion
        import asyncio

        result = asyncio.run(result)
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"task {ctx.task_id} returned a value that is not JSON-serializable: {exc}"
        ) from None
    return result


def _run_task(client: Client, where: Mapping[str, Any]) -> int:
    """Run the task the payload names for the attempt this sandbox's token belongs to."""
    try:
        info = where.get("context") or client.task_context()
        ctx = Context(client=client, info=dict(info))
    except PrivsepError as exc:
        kit.fatal("task", f"cannot fetch the attempt's context: {exc}")
        return kit.ExitCode.API_FAILED
    name = f"{ctx.workflow_id}.{ctx.task_id} (try {ctx.try_number})"
    try:
        try:
            with kit.stopped_by_sigterm():
                result = _call_task(ctx, where)
        except kit.Terminated:
            # Not the task's failure: the sandbox stopped it (its time limit, usually).
            # The supervisor reports the attempt's end with the sandbox's reason.
            kit.fatal("task", f"{name} was stopped by the sandbox (SIGTERM) before it ended")
            return kit.ExitCode.TERMINATED
        except TaskDeferred as deferred:
            ctx.log.info("%s deferred: %s", name, deferred)
            client.defer(deferred.trigger, timeout=deferred.timeout)
        except (Exception, SystemExit) as exc:  # user code failed: report it, exit 0
            error = kit.format_user_error(exc)
            ctx.log.error("%s failed:\n%s", name, error)
            client.retry(error)
        else:
            client.succeed(result)
    except PrivsepError as exc:
        kit.fatal("task", f"cannot report the outcome of {name}: {exc}")
        return kit.ExitCode.API_FAILED
    return kit.ExitCode.OK


run = kit.entry(
    "task",
    _payload_strings,
    'the payload needs "path" (or an importable "module") and "qualname"',
    _run_task,
)
main = kit.bytes_entry(run, "task")
