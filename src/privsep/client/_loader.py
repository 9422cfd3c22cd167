"""Import a definition file and find what it declares.

A definition file is imported under a name derived from its file name alone (``etl.py`` →
``etl``), with its directory at the front of ``sys.path``, so the same name comes out in the
parse, task and trigger sandboxes: a trigger class recorded as ``etl.Sleep`` can be imported
again in the trigger sandbox. A file name that is not an identifier, or that would shadow the
standard library, the SDK or its dependencies, gets ``privsep_definition_<name>`` instead.

Each call executes the file afresh (a new module object replaces any earlier one of that
name), so loading twice never returns stale definitions.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import keyword
import os
import re
import sys
from types import ModuleType
from typing import Any

from privsep.client import _authoring
from privsep.client._authoring import Task, Workflow
from privsep.client._exceptions import DefinitionError

_MARK = "__privsep_definition__"
_RESERVED = frozenset({"privsep", "requests", "urllib3", "certifi", "idna", "charset_normalizer"})


def module_name_for(path: str) -> str:
    """The module name a definition file is imported under (see the module docstring)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if (
        stem.isidentifier()
        and not keyword.iskeyword(stem)
        and stem not in sys.stdlib_module_names
        and stem not in _RESERVED
    ):
        existing = sys.modules.get(stem)
        if existing is None or hasattr(existing, _MARK):
            return stem
    return "privsep_definition_" + (re.sub(r"\W", "_", stem) or "file")


def load_definitions(path: str) -> tuple[ModuleType, list[Workflow]]:
    """Import the definition file at ``path``; return the module and every :class:`Workflow`
    it created or holds at module level, in creation order. Whatever the file raises is
    raised as is (the caller decides whether it is a parse error or a task failure)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"definition file {path} does not exist or is not a file")
    name = module_name_for(path)
    directory = os.path.dirname(path)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    loader = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None:  # pragma: no cover - a SourceFileLoader always yields a spec
        raise DefinitionError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    setattr(module, _MARK, path)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    found: list[Workflow] = []
    _authoring._collectors.append(found)
    try:
        loader.exec_module(module)
    except BaseException:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
        raise
    finally:
        _authoring._collectors.pop()
    for value in list(vars(module).values()):
        if isinstance(value, Workflow) and not any(value is wf for wf in found):
            found.append(value)
    return module, found


def serialize_module(path: str) -> list[dict[str, Any]]:
    """Import the definition file and serialize each of its workflows to the API's
    ``WorkflowDefinition`` JSON. Raises what the import raises, or :class:`DefinitionError`
    for a duplicate workflow id, an unknown upstream task or a cycle."""
    _, workflows = load_definitions(path)
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for wf in workflows:
        if wf.workflow_id in seen:
            raise DefinitionError(f"{path} defines the workflow id {wf.workflow_id!r} twice")
        seen.add(wf.workflow_id)
        out.append(wf.to_dict())
    return out


def find_task(
    workflows: list[Workflow],
    *,
    workflow_id: str,
    task_id: str,
    module: str | None = None,
    qualname: str | None = None,
) -> Task[Any]:
    """The task the server asked for. Found by workflow and task id, then checked against the
    module and qualname recorded at parse time, so a definition file that changed since then
    is reported rather than silently running other code."""
    for wf in workflows:
        if wf.workflow_id != workflow_id:
            continue
        task = wf.tasks.get(task_id)
        if task is None:
            break
        if (module and task.module != module) or (qualname and task.qualname != qualname):
            raise DefinitionError(
                f"task {workflow_id}.{task_id} is {task.module}:{task.qualname} in the definition "
                f"file now, but was {module}:{qualname} when it was parsed"
            )
        return task
    raise DefinitionError(f"the definition file no longer declares task {workflow_id}.{task_id}")


def resolve(module: str, qualname: str) -> Any:
    """The object ``module:qualname``: from an already loaded definition file, or imported."""
    obj: Any = sys.modules.get(module)
    if obj is None:
        obj = importlib.import_module(module)
    for part in qualname.split("."):
        if part == "<locals>":
            raise DefinitionError(f"{module}:{qualname} is local to a function")
        obj = getattr(obj, part)
    return obj
