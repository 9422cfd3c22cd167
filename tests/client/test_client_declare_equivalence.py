"""Declaring a task: the fast paths against the rules written out plainly.

``Workflow.task`` skips work for what most tasks use (the default options, a plain function
with no attributes of its own, a task id that is an ASCII identifier), because every task
sandbox imports its whole definition file again. Here random option combinations and callables
are declared both ways; each declaration must give the same attributes in the same order
(``functools.update_wrapper`` onto a plain object, then the task's own), the same
``to_dict()``, the same tasks in the workflow, or the same exception type and message.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privsep.client import Context, Task, Workflow
from privsep.client._authoring import (  # the rules, and the one helper no fast path skips
    _TASK_ATTRIBUTES,
    DEFAULT_QUEUE,
    ID_PATTERN,
    MAX_RETRIES,
    QUEUE_PATTERN,
    _seconds,
)

EXAMPLES = settings(
    max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
ABSENT: Any = object()  # the option is not passed at all
OWN_TASK = "<a task of this workflow>"  # stand-ins in upstream, resolved when declaring
FOREIGN_TASK = "<a task of another workflow>"
WRAPPER_KEYS = ("__module__", "__name__", "__qualname__", "__doc__", "__annotations__")


class _Int(int):
    """An int subclass: valid, but not what the fast paths test for."""


class _Str(str):
    """A str subclass: valid as an id, but not what the fast paths test for."""


class _Plain:
    """What the reference copies a function onto: nothing of its own in the way."""


# --- the reference: the documented rules, with no fast path --------------------------------


def _task_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ValueError(
            f"{what} {value!r} must be 1-250 characters of letters, digits, '_', '.' or '-'"
        )
    return value


class Reference:
    """What declaring a task in ``wf`` must do, step by step in the documented order."""

    def __init__(self, wf: Workflow) -> None:
        self.wf = wf
        self.ids: list[str] = []

    def declare(self, fn: Any, options: dict[str, Any]) -> _Plain:
        wf = self.wf
        queue = options.get("queue")
        if queue is None:
            queue = wf.queue
        elif not isinstance(queue, str) or not QUEUE_PATTERN.match(queue):
            raise ValueError(
                f"queue {queue!r} must be 1-64 characters of letters, digits, '_', '.' or '-'"
            )
        retries = options.get("retries", 0)
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError(f"retries must be an integer, not {retries!r}")
        if not 0 <= retries <= MAX_RETRIES:
            raise ValueError(f"retries must be between 0 and {MAX_RETRIES}, not {retries}")
        delay = _seconds(options.get("retry_delay", 0), "retry_delay", allow_zero=True)
        timeout = options.get("timeout")
        limit = None if timeout is None else _seconds(timeout, "timeout", allow_zero=False)
        upstream = options.get("upstream", ())
        if isinstance(upstream, (str, Task)):
            upstream = [upstream]
        ups: list[str] = []
        for item in upstream:
            if isinstance(item, Task):
                if item.workflow is not wf:
                    raise ValueError(
                        f"upstream task {item!r} belongs to another workflow than "
                        f"{wf.workflow_id!r}"
                    )
                ups.append(item.task_id)
            elif isinstance(item, str):
                ups.append(_task_id(item, "upstream task id"))
            else:
                raise TypeError(f"upstream must hold tasks or task ids, not {item!r}")
        if not callable(fn):
            raise TypeError(f"@task decorates a function, not {fn!r}")
        task_id = options.get("task_id")
        tid = _task_id(task_id if task_id is not None else fn.__name__, "task id")
        if tid in self.ids:
            raise ValueError(f"workflow {wf.workflow_id!r} already has a task {tid!r}")
        self.ids.append(tid)
        expected = _Plain()
        functools.update_wrapper(expected, fn)
        for name, value in [
            ("func", fn),
            ("workflow", wf),
            ("task_id", tid),
            ("upstream", tuple(dict.fromkeys(ups))),
            ("retries", retries),
            ("retry_delay", delay),
            ("timeout", limit),
            ("queue", queue),
        ]:
            setattr(expected, name, value)
        return expected


def _to_dict(task: Any) -> dict[str, Any]:
    out = {
        "task_id": task.task_id,
        "upstream": list(task.upstream),
        "retries": task.retries,
        "retry_delay": task.retry_delay,
        "timeout": task.timeout,
        "module": str(task.func.__module__),
        "qualname": str(task.func.__qualname__),
    }
    if task.queue != DEFAULT_QUEUE:
        out["queue"] = task.queue
    return out


def _attributes(obj: object) -> list[tuple[str, type, Any]]:
    """Every instance attribute in order, with its type: 0 is not 0.0 here."""
    return [(name, type(value), value) for name, value in vars(obj).items()]


def _outcome(call: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    try:
        return ("made", call(*args))
    except Exception as exc:
        return ("raised", type(exc), str(exc))


# --- what is declared ----------------------------------------------------------------------


@dataclass
class Callee:
    """How to build the callable to declare: made afresh per declaration."""

    kind: str
    name: Any
    doc: str | None
    attributes: dict[str, Any]

    def build(self) -> Any:
        def fn(ctx: Context) -> int:
            return 1

        if self.kind in ("function", "wrapped"):
            fn.__name__ = self.name if isinstance(self.name, str) else str(self.name)
            fn.__qualname__ = f"outer.<locals>.{self.name}"
            fn.__doc__ = self.doc
            fn.__dict__.update(self.attributes)
            if self.kind == "function":
                return fn

            @functools.wraps(fn)
            def wrapper(ctx: Context) -> int:
                return fn(ctx)

            return wrapper
        if self.kind == "lambda":
            return lambda ctx: None
        if self.kind == "partial":  # callable, but no __name__
            return functools.partial(fn)
        if self.kind == "builtin":
            return len
        if self.kind == "object":
            name = self.name

            class Callable_:
                """A callable object, not a function."""

                __name__ = name

                def __call__(self, ctx: Context) -> int:
                    return 2

            return Callable_()
        return self.name  # "not callable": a string or a number


ids = st.one_of(
    st.sampled_from(["a", "b", "t0001", "load_data", "_x", "class", "a.b", "x-y", "0abc"]),
    st.sampled_from(["", "has space", "é", "t\n", "t\n\n", "x" * 250, "x" * 251, "_" * 251]),
    st.from_regex(ID_PATTERN),
    st.text(max_size=6),
)
names = st.one_of(ids, ids.map(_Str))
callees = st.builds(
    Callee,
    kind=st.sampled_from(
        ["function"] * 6 + ["wrapped", "lambda", "partial", "builtin", "object", "not callable"]
    ),
    name=st.one_of(names, st.integers()),
    doc=st.none() | st.text(max_size=5),
    attributes=st.just({})  # a plain function, as most are
    | st.dictionaries(
        st.sampled_from(["owner", "task_id", "retries", "module", "func", *WRAPPER_KEYS]),
        st.integers() | st.text(max_size=3),
        min_size=1,
        max_size=3,
    ),
)


def _option(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]) -> Any:
    """Mostly absent or valid, so that most declarations get as far as making a task."""
    return st.integers(0, 9).flatmap(
        lambda n: st.just(ABSENT) if n < 3 else valid if n < 9 else invalid
    )


options = st.fixed_dictionaries(
    {
        "task_id": _option(st.none() | names, st.integers()),
        "upstream": _option(
            st.sampled_from([(), [], "a", OWN_TASK])
            | st.lists(st.sampled_from(["a", "b", "a", OWN_TASK]), max_size=3)
            | st.lists(st.from_regex(ID_PATTERN), max_size=3).map(tuple),
            st.sampled_from([FOREIGN_TASK, [3], ["bad id"], ("a", FOREIGN_TASK), [None]]),
        ),
        "retries": _option(
            st.integers(0, MAX_RETRIES) | st.sampled_from([_Int(0), _Int(3)]),
            st.sampled_from([-1, MAX_RETRIES + 1, True, False, 1.5, "1", None]),
        ),
        "retry_delay": _option(
            st.sampled_from([0, 0.0, -0.0, 2, _Int(0), timedelta(0), timedelta(seconds=5)])
            | st.floats(min_value=0, allow_infinity=False),
            st.sampled_from([False, True, -1, math.nan, math.inf, "5s", None])
            | st.sampled_from([timedelta(seconds=-1)])
            | st.floats(max_value=-1e-300),
        ),
        "timeout": _option(
            st.sampled_from([None, 1, 2.5, _Int(4), timedelta(seconds=3)])
            | st.floats(min_value=1e-300, allow_infinity=False),
            st.sampled_from([0, 0.0, -1, math.inf, math.nan, "x", True, timedelta(0)]),
        ),
        "queue": _option(
            st.sampled_from([None, "default", "gpu", "q" * 64, _Str("gpu")]),
            st.sampled_from(["bad queue", "", "q" * 65, 3]),
        ),
    }
).map(lambda drawn: {key: value for key, value in drawn.items() if value is not ABSENT})


def _declare(wf: Workflow, fn: Any, given_options: dict[str, Any], form: str) -> Any:
    if form == "call":  # wf.task(fn, ...)
        return wf.task(fn, **given_options)
    return wf.task(**given_options)(fn)  # @wf.task(...)


def _resolve(upstream: Any, wf: Workflow, foreign: Task[Any]) -> Any:
    def one(item: Any) -> Any:
        if item == OWN_TASK:
            return next(iter(wf.tasks.values()), "a")
        if item == FOREIGN_TASK:
            return foreign
        return item

    if isinstance(upstream, (list, tuple)):
        return type(upstream)(one(item) for item in upstream)
    return one(upstream)


@EXAMPLES
@given(
    queue=st.sampled_from([DEFAULT_QUEUE, "gpu"]),
    declarations=st.lists(
        st.tuples(callees, options, st.sampled_from(["decorator", "call"])),
        min_size=1,
        max_size=6,
    ),
)
def test_declaring_a_task_follows_the_plain_rules(
    queue: str, declarations: list[tuple[Callee, dict[str, Any], str]]
) -> None:
    wf = Workflow("w", queue=queue)
    reference = Reference(wf)
    foreign = Workflow("other").task(task_id="f")(lambda ctx: None)
    for callee, drawn, form in declarations:
        given_options = dict(drawn)
        if "upstream" in given_options:
            given_options["upstream"] = _resolve(given_options["upstream"], wf, foreign)
        fn = callee.build()
        got = _outcome(_declare, wf, fn, given_options, form)
        want = _outcome(reference.declare, fn, given_options)
        assert got[0] == want[0], (got, want)
        if got[0] == "raised":
            assert got == want
        else:
            task, expected = got[1], want[1]
            assert _attributes(task) == _attributes(expected)
            assert _outcome(task.to_dict) == _outcome(_to_dict, expected)
            # Task's own constructor gives the same object as a declaration does.
            options = {name: getattr(expected, name) for name in _TASK_ATTRIBUTES[1:]}
            made = Task(fn, **options)
            assert _attributes(made) == _attributes(expected)
        assert list(wf.tasks) == reference.ids


def _one_of_each() -> Iterator[tuple[Callee, dict[str, Any]]]:
    """The cases the fast paths were written for, so they are never left to chance."""
    yield Callee("function", "t0001", None, {}), {"task_id": "t0002"}
    yield Callee("function", "load_data", "Doc.", {}), {}
    yield Callee("function", "plain", None, {"owner": "x", "__doc__": "mine"}), {"retries": 2}
    yield Callee("wrapped", "wrapped", None, {}), {"upstream": ()}
    yield Callee("object", "load", None, {}), {"retry_delay": 0, "timeout": None}


def test_the_fast_paths_own_cases_follow_the_plain_rules() -> None:
    wf = Workflow("w")
    reference = Reference(wf)
    for callee, given_options in _one_of_each():
        fn = callee.build()
        task = wf.task(**given_options)(fn)
        assert _attributes(task) == _attributes(reference.declare(fn, given_options))
    assert list(wf.tasks) == reference.ids == ["t0002", "load_data", "plain", "wrapped", "load"]
