"""The authoring API: what a workflow author writes in a definition file.

A definition file is imported three times, each in its own sandbox: to parse it (the
:class:`Workflow` objects are serialized to plain JSON, never pickled), to run one task (the
callable is found again by module and qualname), and to run a trigger (the class is found by
module and qualname and rebuilt from its JSON constructor arguments). So everything declared
here must be reproducible from the file alone: no state survives from one import to the next.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypedDict, TypeVar, Unpack, overload

from privsep.client._exceptions import DefinitionError, NotFound
from privsep.client._models import Connection, TriggerEvent

if TYPE_CHECKING:
    from privsep.client._client import Client

R = TypeVar("R")
T = TypeVar("T")

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,250}$")
QUEUE_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
DEFAULT_QUEUE = "default"
"""What the API accepts as a workflow or task id."""

MAX_RETRIES = 100
CRON_PRESETS = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,?#\-]+$")

# While a definition file is imported, every Workflow created lands in the innermost list,
# including ones not bound to a module-level name (built in a loop or a factory).
_collectors: list[list[Workflow]] = []


class _Missing:
    def __repr__(self) -> str:
        return "<no default>"


_MISSING: Any = _Missing()


def _seconds(value: object, what: str, *, allow_zero: bool) -> float:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"{what} must be seconds (a number) or a timedelta, not {value!r}")
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        bound = "zero or more" if allow_zero else "more than zero"
        raise ValueError(f"{what} must be {bound} seconds, not {value!r}")
    return seconds


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-250 characters of letters, digits, '_', '.' or '-'"
        )
    return value


def _check_queue(value: object) -> str:
    if not isinstance(value, str) or not QUEUE_PATTERN.match(value):
        raise ValueError(
            f"queue {value!r} must be 1-64 characters of letters, digits, '_', '.' or '-'"
        )
    return value


def _schedule(value: object) -> str | float | None:
    """``None``, a cron preset, a cron expression, or a timedelta (as seconds)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        return _seconds(value, "schedule", allow_zero=False)
    if isinstance(value, str):
        text = " ".join(value.split())
        if text in CRON_PRESETS:
            return text
        fields = text.split(" ")
        if len(fields) in (5, 6) and all(_CRON_FIELD.match(f) for f in fields):
            return text
        raise ValueError(
            f"schedule {value!r} is not a cron expression (5 fields) or one of "
            f"{', '.join(sorted(CRON_PRESETS))}"
        )
    raise TypeError(f"schedule must be None, a cron string or a timedelta, not {value!r}")


def _json_check(value: object, what: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serializable: {exc}") from None


# --- workflows and tasks ------------------------------------------------------------------


def _look_like(
    wrapper: object,
    func: object,
    options: tuple[Workflow, str, tuple[str, ...], int, float, float | None, str],
) -> None:
    """``functools.update_wrapper(wrapper, func)``, then the task's own attributes, which win
    over any of the function's.

    A plain function with no attributes of its own, the usual case, is copied in one dict
    update with the same keys, values and order as ``update_wrapper`` gives. Anything else (a
    callable object, a function with attributes, a ``functools.wraps`` wrapper) gets
    ``update_wrapper`` itself, so its attributes land where that puts them: after the five it
    copies, and replacing them where the names are the same.

    Every task sandbox imports its whole definition file again, so a workflow of a thousand
    tasks pays this a thousand times per task run; the generic version's per-attribute
    ``getattr``/``setattr`` loop was a third of a declaration's cost. The task's options come
    as one tuple, in ``_TASK_ATTRIBUTES`` order after ``func``, and :meth:`Workflow.task` calls
    this on a bare ``object.__new__(Task)``: the two rounds of keyword packing of
    ``Task(...)`` cost nearly as much as the update itself.
    """
    if type(func) is _FunctionType and not func.__dict__ and _PLAIN_WRAPPER_ATTRIBUTES:
        workflow, task_id, upstream, retries, retry_delay, timeout, queue = options
        wrapper.__dict__.update(
            {
                "__module__": func.__module__,
                "__name__": func.__name__,
                "__qualname__": func.__qualname__,
                "__doc__": func.__doc__,
                "__annotations__": func.__annotations__,
                "__wrapped__": func,
                "func": func,
                "workflow": workflow,
                "task_id": task_id,
                "upstream": upstream,
                "retries": retries,
                "retry_delay": retry_delay,
                "timeout": timeout,
                "queue": queue,
            }
        )
        return
    functools.update_wrapper(wrapper, func)  # type: ignore[arg-type]
    wrapper.__dict__.update(zip(_TASK_ATTRIBUTES, (func, *options), strict=True))


_FunctionType = type(_look_like)
# The one-update path above copies exactly these; another Python's update_wrapper may copy
# more (3.12 adds __type_params__), and then every task takes the generic path.
_PLAIN_WRAPPER_ATTRIBUTES = functools.WRAPPER_ASSIGNMENTS == (
    "__module__",
    "__name__",
    "__qualname__",
    "__doc__",
    "__annotations__",
) and functools.WRAPPER_UPDATES == ("__dict__",)
# What _look_like sets after update_wrapper's: func, then its options in their order.
_TASK_ATTRIBUTES = (
    "func",
    "workflow",
    "task_id",
    "upstream",
    "retries",
    "retry_delay",
    "timeout",
    "queue",
)
_new_object = object.__new__
_NO_UPSTREAM: tuple[()] = ()


class Task(Generic[R]):
    """One task of a :class:`Workflow`: the decorated function plus its options.

    Calling it calls the function. Pass it in another task's ``upstream``.
    """

    # Set by _look_like, called by __init__ or directly by Workflow.task.
    func: Callable[[Context], R]
    workflow: Workflow
    task_id: str
    upstream: tuple[str, ...]
    retries: int
    retry_delay: float
    timeout: float | None
    queue: str

    def __init__(
        self,
        func: Callable[[Context], R],
        *,
        workflow: Workflow,
        task_id: str,
        upstream: tuple[str, ...],
        retries: int,
        retry_delay: float,
        timeout: float | None,
        queue: str = DEFAULT_QUEUE,
    ) -> None:
        _look_like(self, func, (workflow, task_id, upstream, retries, retry_delay, timeout, queue))

    def __call__(self, ctx: Context) -> R:
        return self.func(ctx)

    @property
    def module(self) -> str:
        return str(self.func.__module__)

    @property
    def qualname(self) -> str:
        return str(self.func.__qualname__)

    def to_dict(self) -> dict[str, Any]:
        """The API's ``TaskDefinition``. The queue only when it is not the default, so a
        definition that names none serializes as it always did."""
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "upstream": list(self.upstream),
            "retries": self.retries,
            "retry_delay": self.retry_delay,
            "timeout": self.timeout,
            "module": self.module,
            "qualname": self.qualname,
        }
        if self.queue != DEFAULT_QUEUE:
            out["queue"] = self.queue
        return out

    def __repr__(self) -> str:
        return f"<Task {self.workflow.workflow_id}.{self.task_id}>"


class TaskOptions(TypedDict, total=False):
    """The keyword options of ``@wf.task(...)``, as :meth:`Workflow.task` documents them."""

    task_id: str | None
    upstream: Task[Any] | str | Iterable[Task[Any] | str]
    retries: int
    retry_delay: float | timedelta
    timeout: float | timedelta | None
    queue: str | None


class Workflow:
    """A named graph of tasks, declared in a definition file.

    ``schedule`` is ``None`` (runs only when triggered), a cron preset such as ``"@hourly"``,
    a cron expression, or a :class:`~datetime.timedelta` between runs. ``queue`` is the work
    queue of its tasks (Airflow's ``queue``): only a supervisor that serves it runs them.
    """

    def __init__(
        self,
        workflow_id: str,
        *,
        schedule: str | timedelta | None = None,
        queue: str = DEFAULT_QUEUE,
    ) -> None:
        self.workflow_id = _check_id(workflow_id, "workflow id")
        self.schedule = _schedule(schedule)
        self.queue = _check_queue(queue)
        self._tasks: dict[str, Task[Any]] = {}
        if _collectors:
            _collectors[-1].append(self)

    @property
    def tasks(self) -> Mapping[str, Task[Any]]:
        """Task id → :class:`Task`, in declaration order."""
        return dict(self._tasks)

    @overload
    def task(self, func: Callable[[Context], R], /) -> Task[R]: ...

    @overload
    def task(
        self, /, **options: Unpack[TaskOptions]
    ) -> Callable[[Callable[[Context], R]], Task[R]]: ...

    def task(
        self,
        func: Callable[[Context], Any] | None = None,
        /,
        *,
        task_id: str | None = None,
        upstream: Task[Any] | str | Iterable[Task[Any] | str] = _NO_UPSTREAM,
        retries: int = 0,
        retry_delay: float | timedelta = 0,
        timeout: float | timedelta | None = None,
        queue: str | None = None,
    ) -> Task[Any] | Callable[[Callable[[Context], Any]], Task[Any]]:
        """Declare a task: ``@wf.task`` or ``@wf.task(upstream=[...], retries=2, ...)``.

        ``upstream`` holds tasks of this workflow (or their ids); ``retries`` is how many more
        tries a failing task gets, ``retry_delay`` the seconds between them; ``timeout`` is the
        wall-clock limit of one try, in seconds; ``queue`` overrides the workflow's work
        queue for this task. The task id is the function's name unless ``task_id`` is given.
        """
        # Each check starts with a test for its default that skips the rest: the defaults are
        # what most of a large workflow's tasks use, and every task sandbox declares them all.
        task_queue = self.queue if queue is None else _check_queue(queue)
        if type(retries) is not int and (isinstance(retries, bool) or not isinstance(retries, int)):
            raise TypeError(f"retries must be an integer, not {retries!r}")
        if not 0 <= retries <= MAX_RETRIES:
            raise ValueError(f"retries must be between 0 and {MAX_RETRIES}, not {retries}")
        if retry_delay.__class__ is int and retry_delay == 0:
            delay = 0.0
        else:
            delay = _seconds(retry_delay, "retry_delay", allow_zero=True)
        limit = None if timeout is None else _seconds(timeout, "timeout", allow_zero=False)
        # In CPython every empty tuple is this one object: the default and () alike skip it.
        ups = () if upstream is _NO_UPSTREAM else self._upstream_ids(upstream)
        if func is not None:
            return self._declare(func, task_id, ups, retries, delay, limit, task_queue)

        def declare(fn: Callable[[Context], Any]) -> Task[Any]:
            return self._declare(fn, task_id, ups, retries, delay, limit, task_queue)

        return declare

    def _upstream_ids(
        self, upstream: Task[Any] | str | Iterable[Task[Any] | str]
    ) -> tuple[str, ...]:
        """``upstream`` as task ids, each once, in the order given."""
        if isinstance(upstream, (str, Task)):
            upstream = [upstream]
        ups: list[str] = []
        for item in upstream:
            if isinstance(item, Task):
                if item.workflow is not self:
                    raise ValueError(
                        f"upstream task {item!r} belongs to another workflow than "
                        f"{self.workflow_id!r}"
                    )
                ups.append(item.task_id)
            elif isinstance(item, str):
                ups.append(_check_id(item, "upstream task id"))
            else:
                raise TypeError(f"upstream must hold tasks or task ids, not {item!r}")
        return tuple(dict.fromkeys(ups))

    def _declare(
        self,
        fn: Callable[[Context], Any],
        task_id: str | None,
        upstream: tuple[str, ...],
        retries: int,
        retry_delay: float,
        timeout: float | None,
        queue: str,
    ) -> Task[Any]:
        """Check ``fn`` and its task id, and add its task; the options are checked already."""
        if not callable(fn):
            raise TypeError(f"@task decorates a function, not {fn!r}")
        tid = task_id if task_id is not None else fn.__name__
        # An ASCII identifier of up to 250 characters is a valid id, and these three string
        # methods cost half of a regex match; anything else (a '-', a '.', a leading digit, a
        # non-str) goes to _check_id, which has the last word and words the error.
        if type(tid) is not str or not (tid.isidentifier() and tid.isascii() and len(tid) <= 250):
            tid = _check_id(tid, "task id")
        if tid in self._tasks:
            raise ValueError(f"workflow {self.workflow_id!r} already has a task {tid!r}")
        # Task.__init__'s work without the call to Task (see _look_like).
        task: Task[Any] = _new_object(Task)
        _look_like(task, fn, (self, tid, upstream, retries, retry_delay, timeout, queue))
        self._tasks[tid] = task
        return task

    def to_dict(self) -> dict[str, Any]:
        """The API's ``WorkflowDefinition``: plain JSON, checked for unknown upstream tasks
        and cycles (:class:`DefinitionError`)."""
        for task in self._tasks.values():
            for up in task.upstream:
                if up not in self._tasks:
                    raise DefinitionError(
                        f"task {task.task_id!r} of workflow {self.workflow_id!r} names an "
                        f"unknown upstream task {up!r}"
                    )
        cycle = self._find_cycle()
        if cycle:
            raise DefinitionError(
                f"workflow {self.workflow_id!r} has a dependency cycle: {' -> '.join(cycle)}"
            )
        return {
            "workflow_id": self.workflow_id,
            "schedule": self.schedule,
            "tasks": [task.to_dict() for task in self._tasks.values()],
        }

    def _find_cycle(self) -> list[str]:
        state: dict[str, int] = {}  # 1: on the current path, 2: done
        path: list[str] = []

        def visit(tid: str) -> list[str]:
            state[tid] = 1
            path.append(tid)
            for up in self._tasks[tid].upstream:
                if state.get(up) == 1:
                    return [*path[path.index(up) :], up]
                if up not in state:
                    found = visit(up)
                    if found:
                        return found
            path.pop()
            state[tid] = 2
            return []

        for tid in self._tasks:
            if tid not in state:
                found = visit(tid)
                if found:
                    return found
        return []

    def __repr__(self) -> str:
        return f"<Workflow {self.workflow_id!r} ({len(self._tasks)} tasks)>"


# --- triggers ----------------------------------------------------------------------------


class Trigger:
    """Base class of asynchronous triggers.

    Subclass it and implement ``async def run(self)`` as an async generator that yields a
    :class:`TriggerEvent` when its condition is met. A task parks itself on an instance with
    ``ctx.defer(MyTrigger(...))``; the instance is recorded as its class's module and qualname
    plus the keyword arguments it was constructed with, so those must be JSON-serializable,
    and the class must live at module level of an importable module (or definition file).
    The trigger sandbox rebuilds it as ``cls(**kwargs)``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        # Record the outermost constructor call; a super().__init__() inside it is skipped.
        def __init__(self: Trigger, *args: Any, **kw: Any) -> None:
            if "_privsep_init" not in getattr(self, "__dict__", {"_privsep_init": None}):
                self.__dict__["_privsep_init"] = (init, args, kw)
            init(self, *args, **kw)

        functools.update_wrapper(__init__, init)
        cls.__init__ = __init__  # type: ignore[method-assign,assignment]

    def run(self) -> AsyncIterator[TriggerEvent]:
        """Yield a :class:`TriggerEvent` when the condition is met. Only the first is used."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement async def run()")

    def serialize(self) -> dict[str, Any]:
        """``{"module", "qualname", "kwargs"}``, as the API stores a trigger. Raises
        ``TypeError`` when the trigger could not be rebuilt from that in another process."""
        cls = type(self)
        name = f"{cls.__module__}.{cls.__qualname__}"
        if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
            raise TypeError(
                f"trigger class {name} must be defined at module level of a definition file or "
                "an importable module, so the trigger sandbox can import it"
            )
        import inspect  # only on this path: keeps `import privsep.client` lean

        if not inspect.isasyncgenfunction(cls.run):
            raise TypeError(f"{name}.run must be an async generator function (async def + yield)")
        kwargs = _constructor_kwargs(self, name)
        _json_check(kwargs, f"the constructor arguments of trigger {name}")
        return {"module": cls.__module__, "qualname": cls.__qualname__, "kwargs": kwargs}

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} trigger>"


def _constructor_kwargs(trigger: Trigger, name: str) -> dict[str, Any]:
    import dataclasses
    import inspect

    recorded = getattr(trigger, "__dict__", {}).get("_privsep_init")
    if recorded is None:
        if dataclasses.is_dataclass(trigger):  # its __init__ was made after __init_subclass__
            return {f.name: getattr(trigger, f.name) for f in dataclasses.fields(trigger) if f.init}
        if type(trigger).__init__ is object.__init__:
            return {}
        raise TypeError(f"cannot tell how trigger {name} was constructed")
    init, args, kw = recorded
    signature = inspect.signature(init)
    bound = signature.bind(trigger, *args, **kw)
    params = list(signature.parameters.values())
    out: dict[str, Any] = {}
    for param in params[1:]:
        if param.name not in bound.arguments:
            continue
        value = bound.arguments[param.name]
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(
                f"trigger {name} takes {param.name!r} as positional-only; the trigger sandbox "
                "rebuilds triggers with keyword arguments"
            )
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(
                    f"trigger {name} was given *{param.name}; the trigger sandbox rebuilds "
                    "triggers with keyword arguments only"
                )
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
            continue
        out[param.name] = value
    return out


class TaskDeferred(BaseException):
    """Raised by :meth:`Context.defer` to end the task's code and park the attempt.

    It derives from ``BaseException`` so that ``except Exception`` in task code does not
    swallow it; if task code catches everything, it must re-raise this.
    """

    def __init__(self, trigger: dict[str, Any], timeout: float | None) -> None:
        super().__init__(f"deferred on {trigger['module']}.{trigger['qualname']}")
        self.trigger = trigger
        self.timeout = timeout


# --- the task's view of its attempt ------------------------------------------------------


class Context:
    """What a task function receives: its attempt's identity and its way to the API.

    ``run_id``, ``workflow_id``, ``task_id``, ``try_number`` (1 for the first try), ``params``
    (the run's configuration) and ``trigger_event`` (the :class:`TriggerEvent` that resumed a
    deferred task, else ``None``) describe the attempt. ``log`` is a logger whose output goes
    to stderr, which the supervisor captures into the attempt's log.

    Every method is a call to the API, made with this attempt's short-lived token: variables
    and connections need an operator policy grant (else :class:`NotPermitted`), XComs are read
    within this run and written only for this task.
    """

    def __init__(self, *, client: Client, info: Mapping[str, Any]) -> None:
        self._client = client
        self.attempt_id = str(info["attempt_id"])
        self.run_id = str(info["run_id"])
        self.workflow_id = str(info["workflow_id"])
        self.task_id = str(info["task_id"])
        self.try_number = int(info["try_number"])
        self.params: dict[str, Any] = dict(info.get("params") or {})
        event = info.get("trigger_event")
        self.trigger_event = (
            TriggerEvent(event.get("payload")) if isinstance(event, Mapping) else None
        )
        self.log = logging.getLogger(f"privsep.task.{self.workflow_id}.{self.task_id}")

    def __repr__(self) -> str:
        return (
            f"<Context {self.workflow_id}.{self.task_id} run={self.run_id} try={self.try_number}>"
        )

    # variables

    @overload
    def get_variable(self, key: str) -> str: ...

    @overload
    def get_variable(self, key: str, default: T) -> str | T: ...

    def get_variable(self, key: str, default: Any = _MISSING) -> Any:
        """The variable's value; ``default`` if it does not exist, or :class:`NotFound` when
        no default is given. A variable the policy does not grant raises
        :class:`NotPermitted` even with a default: a denial is never silently a default."""
        try:
            return self._client.get_variable(key)
        except NotFound:
            if default is _MISSING:
                raise
            return default

    def set_variable(self, key: str, value: str) -> None:
        """Create or replace a variable (values are strings; ``json.dumps`` structures)."""
        self._client.set_variable(key, value)

    def delete_variable(self, key: str) -> None:
        """Delete a variable; :class:`NotFound` if it does not exist."""
        self._client.delete_variable(key)

    # connections

    def get_connection(self, conn_id: str) -> Connection:
        """A connection granted to this workflow; its ``repr`` masks password and extra."""
        return self._client.get_connection(conn_id)

    # XComs

    def xcom_push(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serializable) as this task's XCom ``key`` in this run."""
        _json_check(value, f"XCom {key!r}")
        self._client.xcom_push(key, value)

    def xcom_pull(self, task_id: str, key: str = "return_value", default: Any = _MISSING) -> Any:
        """An XCom of ``task_id`` in this run (its return value by default); ``default`` if
        there is none, or :class:`NotFound` when no default is given."""
        try:
            return self._client.xcom_pull(task_id, key)
        except NotFound:
            if default is _MISSING:
                raise
            return default

    # deferral

    def defer(self, trigger: Trigger, *, timeout: float | timedelta | None = None) -> NoReturn:
        """Park this attempt until ``trigger`` fires; this task's code ends here.

        No sandbox is held while the attempt waits. When the trigger fires the task runs
        again (same try) with ``ctx.trigger_event`` set; if ``timeout`` seconds pass first,
        the attempt fails (or retries).
        """
        if not isinstance(trigger, Trigger):
            raise TypeError(f"defer() takes a Trigger instance, not {trigger!r}")
        limit = None if timeout is None else _seconds(timeout, "timeout", allow_zero=False)
        raise TaskDeferred(trigger.serialize(), limit)
