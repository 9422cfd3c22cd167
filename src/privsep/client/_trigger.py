"""The trigger component: run a batch of triggers in one event loop and report each one.

Runs inside a trigger sandbox. Payload: ``{"paths": [definition files]}``; ``paths`` may be
empty or absent when every trigger class lives in an importable module. The definition files
are imported first (as :mod:`privsep.client._loader` names them), so a trigger class declared
in ``etl.py`` and recorded as ``etl.Sleep`` resolves.

Steps: ``GET /v1/trigger/assigned``; rebuild each trigger as ``cls(**kwargs)``; run every
``run()`` async generator concurrently in one asyncio loop. For each trigger, the first
:class:`~privsep.client.TriggerEvent` it yields is sent with ``POST /v1/trigger/{id}/event``
(its deferred task is queued again); if it raises, cannot be rebuilt, or ends without an
event, ``POST /v1/trigger/{id}/failure`` with the traceback (the task fails or retries).

Exit 0 when every trigger's outcome was reported (or the trigger was no longer this batch's);
non-zero (:class:`ExitCode`) when a report failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from privsep.client._authoring import Trigger
from privsep.client._client import Client
from privsep.client._components import (
    ExitCode,
    bytes_entry,
    entry,
    fatal,
    format_user_error,
)
from privsep.client._exceptions import (
    Conflict,
    PrivsepError,
    Unauthorized,
)
from privsep.client._loader import load_definitions, resolve
from privsep.client._models import TriggerEvent

__all__ = ["main", "run"]

log = logging.getLogger("privsep.trigger")


class _Failed(Exception):
    """The trigger's own failure, with the text to report."""


def _paths(payload: Mapping[str, Any]) -> list[str] | None:
    paths = payload.get("paths", [])
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        return None
    return list(paths)


def _build(item: Mapping[str, Any], import_errors: list[str]) -> Trigger:
    module, qualname = str(item.get("module", "")), str(item.get("qualname", ""))
    try:
        cls = resolve(module, qualname)
    except Exception as exc:
        hint = "".join(f"\n(while importing a definition file: {e})" for e in import_errors)
        raise _Failed(f"cannot import trigger class {module}:{qualname}: {exc!r}{hint}") from None
    if not (isinstance(cls, type) and issubclass(cls, Trigger)):
        raise _Failed(f"{module}:{qualname} is not a privsep Trigger subclass")
    kwargs = item.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _Failed(f"trigger {module}:{qualname} has kwargs that are not an object")
    return cls(**kwargs)


async def _first_event(trigger: Trigger) -> TriggerEvent:
    events = trigger.run()
    try:
        event = await events.__anext__()
    except StopAsyncIteration:
        raise _Failed(f"{trigger!r} ended without yielding a TriggerEvent") from None
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
    if not isinstance(event, TriggerEvent):
        raise _Failed(f"{trigger!r} yielded {event!r}, not a TriggerEvent")
    try:
        json.dumps(event.payload, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _Failed(f"{trigger!r} yielded a payload that is not JSON: {exc}") from None
    return event


async def _drive(client: Client, item: Mapping[str, Any], import_errors: list[str]) -> bool:
    """Run one trigger to its first event and report it; False if the report failed."""
    trigger_id = str(item.get("id", ""))
    try:
        try:
            event = await _first_event(_build(item, import_errors))
        except _Failed as exc:
            log.error("trigger %s failed: %s", trigger_id, exc)
            await asyncio.to_thread(client.fail_trigger, trigger_id, str(exc))
        except Exception as exc:  # the trigger's own code raised
            error = format_user_error(exc)
            log.error("trigger %s raised:\n%s", trigger_id, error)
            await asyncio.to_thread(client.fail_trigger, trigger_id, error)
        else:
            log.info("trigger %s fired", trigger_id)
            await asyncio.to_thread(client.fire_trigger, trigger_id, event.payload)
    except (Conflict, Unauthorized) as exc:
        # Not ours any more (re-queued after a supervisor restart, or the task ended).
        log.warning("trigger %s is no longer this batch's: %s", trigger_id, exc)
    except PrivsepError as exc:
        fatal("trigger", f"cannot report the outcome of trigger {trigger_id}: {exc}")
        return False
    return True


async def _drive_all(client: Client, items: list[dict[str, Any]], errors: list[str]) -> bool:
    results = await asyncio.gather(*(_drive(client, item, errors) for item in items))
    return all(results)


def _run_batch(client: Client, paths: list[str]) -> int:
    """Run this batch's triggers; see the module docstring."""
    try:
        items = client.assigned_triggers()
    except PrivsepError as exc:
        fatal("trigger", f"cannot fetch this batch's triggers: {exc}")
        return ExitCode.API_FAILED
    import_errors: list[str] = []
    for path in paths:
        try:
            load_definitions(path)
        except (Exception, SystemExit) as exc:
            import_errors.append(f"{path}: {type(exc).__name__}: {exc}")
    ok = asyncio.run(_drive_all(client, items, import_errors))
    return ExitCode.OK if ok else ExitCode.API_FAILED


run = entry(
    "trigger",
    _paths,
    'the payload\'s "paths" must be a list of definition files',
    _run_batch,
)
main = bytes_entry(run, "trigger")
