"""The authoring API: declaring workflows, tasks and triggers, and what they serialize to.

No server here: these are the rules a definition file meets at import time, and the JSON the
parse and trigger sandboxes rebuild things from.
"""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from client_kit import WORKFLOWS

from privsep.client import (
    Connection,
    Context,
    DefinitionError,
    MockTransport,
    NotFound,
    NotPermitted,
    Task,
    TaskDeferred,
    Trigger,
    TriggerEvent,
    Workflow,
)
from privsep.client._client import Client
from privsep.client._loader import load_definitions, module_name_for, resolve, serialize_module

# --- workflows and tasks -------------------------------------------------------------------


def test_a_bare_decorator_makes_a_task_named_after_the_function() -> None:
    wf = Workflow("plain")

    @wf.task
    def extract(ctx: Context) -> int:
        """Docs survive."""
        return 3

    assert isinstance(extract, Task)
    assert extract.task_id == "extract"
    assert extract.__doc__ == "Docs survive."
    assert extract(None) == 3  # type: ignore[arg-type]
    assert list(wf.tasks) == ["extract"]
    assert repr(extract) == "<Task plain.extract>"
    assert wf.to_dict()["tasks"] == [
        {
            "task_id": "extract",
            "upstream": [],
            "retries": 0,
            "retry_delay": 0.0,
            "timeout": None,
            "module": __name__,
            "qualname": (
                "test_a_bare_decorator_makes_a_task_named_after_the_function.<locals>.extract"
            ),
        }
    ]


def test_options_are_normalized_to_seconds() -> None:
    wf = Workflow("opts", schedule=timedelta(hours=1))

    @wf.task
    def a(ctx: Context) -> None: ...

    @wf.task(upstream=[a, "a"], retries=2, retry_delay=timedelta(minutes=1), timeout=60)
    def b(ctx: Context) -> None: ...

    @wf.task(upstream=b, task_id="c.final-step", retry_delay=2.5, timeout=timedelta(seconds=9))
    def c(ctx: Context) -> None: ...

    out = wf.to_dict()
    assert out["schedule"] == 3600.0
    assert [
        (t["task_id"], t["upstream"], t["retry_delay"], t["timeout"]) for t in out["tasks"]
    ] == [
        ("a", [], 0.0, None),
        ("b", ["a"], 60.0, 60.0),
        ("c.final-step", ["b"], 2.5, 9.0),
    ]
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (None, None),
        ("@hourly", "@hourly"),
        ("@daily", "@daily"),
        ("0 3 * * 1-5", "0 3 * * 1-5"),
        ("  */15   * * * *  ", "*/15 * * * *"),
        ("0 0 1 JAN,JUL *", "0 0 1 JAN,JUL *"),
        (timedelta(minutes=5), 300.0),
    ],
)
def test_schedules(schedule: Any, expected: Any) -> None:
    assert Workflow("s", schedule=schedule).schedule == expected


@pytest.mark.parametrize(
    ("schedule", "error", "message"),
    [
        ("every day", ValueError, "is not a cron expression"),
        ("@sometimes", ValueError, "is not a cron expression"),
        ("* * * *", ValueError, "is not a cron expression"),
        ("* * * * ; rm", ValueError, "is not a cron expression"),
        (timedelta(0), ValueError, "more than zero"),
        (3600, TypeError, "None, a cron string or a timedelta"),
    ],
)
def test_bad_schedules_are_refused_at_declaration(
    schedule: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Workflow("s", schedule=schedule)


def test_a_task_looks_like_what_it_wraps_function_or_not() -> None:
    wf = Workflow("looks")

    def extract(ctx: Context) -> int:
        return 1

    extract.owner = "data-team"  # type: ignore[attr-defined]
    task = wf.task(extract)
    assert (task.__name__, task.__qualname__, task.__module__) == (
        "extract",
        extract.__qualname__,
        __name__,
    )
    assert task.__wrapped__ is extract
    assert task.__annotations__ == {"ctx": "Context", "return": "int"}
    assert task.owner == "data-team"  # type: ignore[attr-defined]
    assert task.task_id == "extract"  # the function's attributes never replace the task's own

    class Callable:
        """A callable object, not a function."""

        __name__ = "load"

        def __call__(self, ctx: Context) -> int:
            return 2

    other = wf.task(Callable())
    assert (other.task_id, other.__doc__, other(None)) == (  # type: ignore[arg-type]
        "load",
        "A callable object, not a function.",
        2,
    )


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"retries": -1}, ValueError, "between 0 and 100"),
        ({"retries": 101}, ValueError, "between 0 and 100"),
        ({"retries": True}, TypeError, "integer"),
        ({"retries": 1.5}, TypeError, "integer"),
        ({"retry_delay": -1}, ValueError, "zero or more"),
        ({"retry_delay": math.nan}, ValueError, "zero or more"),
        ({"retry_delay": "5s"}, TypeError, "seconds"),
        ({"retry_delay": False}, TypeError, "seconds"),  # equal to 0, but not a number of seconds
        ({"timeout": 0}, ValueError, "more than zero"),
        ({"timeout": math.inf}, ValueError, "more than zero"),
        ({"upstream": [3]}, TypeError, "tasks or task ids"),
        ({"upstream": ["bad id"]}, ValueError, "upstream task id"),
        ({"task_id": "has space"}, ValueError, "task id 'has space'"),
        ({"task_id": "x" * 251}, ValueError, "1-250 characters"),
    ],
)
def test_bad_task_options_are_refused_at_declaration(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    wf = Workflow("bad")
    with pytest.raises(error, match=message):
        wf.task(**options)(lambda ctx: None)


def test_task_ids_are_unique_and_upstream_stays_in_its_workflow() -> None:
    one, two = Workflow("one"), Workflow("two")

    @one.task
    def t(ctx: Context) -> None: ...

    with pytest.raises(ValueError, match="already has a task 't'"):
        one.task(task_id="t")(lambda ctx: None)
    with pytest.raises(ValueError, match="belongs to another workflow"):
        two.task(upstream=[t])(lambda ctx: None)


def test_graph_errors_surface_when_serialized() -> None:
    wf = Workflow("g")
    wf.task(task_id="a", upstream=["b"])(lambda ctx: None)
    with pytest.raises(DefinitionError, match="unknown upstream task 'b'"):
        wf.to_dict()
    wf.task(task_id="b", upstream=["a"])(lambda ctx: None)
    with pytest.raises(DefinitionError, match="dependency cycle: a -> b -> a"):
        wf.to_dict()
    self_loop = Workflow("self")
    self_loop.task(task_id="x", upstream=["x"])(lambda ctx: None)
    with pytest.raises(DefinitionError, match="cycle: x -> x"):
        self_loop.to_dict()


# --- loading definition files ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "module"),
    [
        ("etl.py", "etl"),
        ("daily_report.py", "daily_report"),
        ("json.py", "privsep_definition_json"),  # would shadow the standard library
        ("requests.py", "privsep_definition_requests"),  # ... or the SDK's dependency
        ("privsep.py", "privsep_definition_privsep"),
        ("class.py", "privsep_definition_class"),  # a keyword
        ("my-flow.v2.py", "privsep_definition_my_flow_v2"),
    ],
)
def test_module_names_depend_on_the_file_name_only(filename: str, module: str) -> None:
    assert module_name_for(f"/bundle/a/{filename}") == module
    assert module_name_for(f"/elsewhere/{filename}") == module


def test_serialize_module_is_plain_json_with_module_and_qualname(tmp_path: Path) -> None:
    out = serialize_module(str(WORKFLOWS / "etl.py"))
    assert json.loads(json.dumps(out)) == out
    (etl,) = out
    assert [(t["task_id"], t["module"], t["qualname"], t["upstream"]) for t in etl["tasks"]] == [
        ("extract", "etl", "extract", []),
        ("load", "etl", "load", ["extract"]),
        ("wait_then_finish", "etl", "wait_then_finish", ["load"]),
    ]
    assert etl["tasks"][1] | {"retries": 2, "retry_delay": 5.0, "timeout": 60.0} == etl["tasks"][1]


def test_each_load_executes_the_file_afresh(tmp_path: Path) -> None:
    path = tmp_path / "fresh.py"
    path.write_text("from privsep.client import Workflow\nwf = Workflow('v1')\n")
    assert [w["workflow_id"] for w in serialize_module(str(path))] == ["v1"]
    path.write_text("from privsep.client import Workflow\nwf = Workflow('v2')\n")
    assert [w["workflow_id"] for w in serialize_module(str(path))] == ["v2"]


def test_a_failed_import_leaves_no_half_module_behind(tmp_path: Path) -> None:
    import sys

    path = tmp_path / "half.py"
    path.write_text("X = 1\nraise ImportError('missing dependency')\n")
    with pytest.raises(ImportError, match="missing dependency"):
        load_definitions(str(path))
    assert "half" not in sys.modules


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        serialize_module(str(tmp_path / "nope.py"))


# --- triggers --------------------------------------------------------------------------------


class Waits(Trigger):
    def __init__(self, seconds: float, label: str = "default", *, poll: float = 1.0) -> None:
        self.seconds = seconds
        self.label = label
        self.poll = poll

    async def run(self):  # type: ignore[no-untyped-def]
        yield TriggerEvent({"label": self.label})


class WaitsLonger(Waits):
    def __init__(self, factor: int, **rest: Any) -> None:
        super().__init__(seconds=10.0 * factor, **rest)
        self.factor = factor


@dataclasses.dataclass
class DataTrigger(Trigger):
    target: str
    tries: int = 3

    async def run(self):  # type: ignore[no-untyped-def]
        yield TriggerEvent(self.target)


class NoArgs(Trigger):
    async def run(self):  # type: ignore[no-untyped-def]
        yield TriggerEvent(None)


def rebuilt(trigger: Trigger) -> Trigger:
    data = json.loads(json.dumps(trigger.serialize()))
    cls = resolve(data["module"], data["qualname"])
    instance = cls(**data["kwargs"])
    assert isinstance(instance, Trigger)
    return instance


def test_trigger_constructor_arguments_are_captured_as_keywords() -> None:
    trigger = Waits(2.5, "x")
    assert trigger.serialize() == {
        "module": __name__,
        "qualname": "Waits",
        "kwargs": {"seconds": 2.5, "label": "x"},  # defaults not passed are not recorded
    }
    again = rebuilt(trigger)
    assert isinstance(again, Waits)
    assert vars(again)["seconds"] == 2.5


def test_the_outermost_constructor_call_is_the_one_recorded() -> None:
    trigger = WaitsLonger(3, label="l", poll=0.5)
    assert trigger.serialize()["kwargs"] == {"factor": 3, "label": "l", "poll": 0.5}
    again = rebuilt(trigger)
    assert isinstance(again, WaitsLonger)
    assert (again.seconds, again.label) == (30.0, "l")


def test_dataclass_and_argument_free_triggers_serialize() -> None:
    assert DataTrigger("db", tries=5).serialize()["kwargs"] == {"target": "db", "tries": 5}
    assert NoArgs().serialize()["kwargs"] == {}
    assert isinstance(rebuilt(DataTrigger("db")), DataTrigger)


def test_the_issue_example_trigger_round_trips() -> None:
    _, _ = load_definitions(str(WORKFLOWS / "etl.py"))
    sleep_cls = resolve("etl", "Sleep")
    assert sleep_cls(1.0).serialize() == {
        "module": "etl",
        "qualname": "Sleep",
        "kwargs": {"seconds": 1.0},
    }


def test_triggers_that_cannot_be_rebuilt_are_refused_at_defer_time() -> None:
    class Local(Trigger):
        async def run(self):  # type: ignore[no-untyped-def]
            yield TriggerEvent(None)

    with pytest.raises(TypeError, match="must be defined at module level"):
        Local().serialize()
    with pytest.raises(TypeError, match="JSON-serializable"):
        Waits(1.0, label=object()).serialize()  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="JSON-serializable"):
        Waits(math.nan).serialize()
    with pytest.raises(TypeError, match="async generator function"):
        NotAGenerator().serialize()
    with pytest.raises(TypeError, match="positional-only"):
        PositionalOnly(1).serialize()
    with pytest.raises(TypeError, match=r"given \*values"):
        StarArgs(1, 2).serialize()


class NotAGenerator(Trigger):
    async def run(self):  # type: ignore[no-untyped-def,override]
        return TriggerEvent(None)


class PositionalOnly(Trigger):
    def __init__(self, value: int, /) -> None:
        self.value = value

    async def run(self):  # type: ignore[no-untyped-def]
        yield TriggerEvent(None)


class StarArgs(Trigger):
    def __init__(self, *values: int) -> None:
        self.values = values

    async def run(self):  # type: ignore[no-untyped-def]
        yield TriggerEvent(None)


# --- Context without a server --------------------------------------------------------------


INFO = {
    "attempt_id": "att",
    "run_id": "run",
    "workflow_id": "wf",
    "task_id": "t",
    "try_number": 2,
    "params": {"p": 1},
    "trigger_event": {"payload": {"slept": 1.0}},
}


def context(handler: Any) -> Context:
    return Context(client=Client(transport=MockTransport(handler)), info=INFO)


def test_context_exposes_the_attempt_and_its_trigger_event() -> None:
    ctx = context(lambda m, p, b: (500, None))
    assert (ctx.run_id, ctx.workflow_id, ctx.task_id, ctx.try_number) == ("run", "wf", "t", 2)
    assert ctx.params == {"p": 1}
    assert ctx.trigger_event == TriggerEvent({"slept": 1.0})
    assert ctx.log.name == "privsep.task.wf.t"
    assert repr(ctx) == "<Context wf.t run=run try=2>"


def test_defer_raises_past_except_exception() -> None:
    ctx = context(lambda m, p, b: (500, None))
    with pytest.raises(TaskDeferred) as deferred:
        try:
            ctx.defer(Waits(5.0), timeout=timedelta(minutes=2))
        except Exception:  # task code that catches "everything" still defers
            pytest.fail("TaskDeferred was caught by except Exception")
    assert deferred.value.trigger == {
        "module": __name__,
        "qualname": "Waits",
        "kwargs": {"seconds": 5.0},
    }
    assert deferred.value.timeout == 120.0
    with pytest.raises(TypeError, match="Trigger instance"):
        ctx.defer("Waits(5)")  # type: ignore[arg-type]


def test_a_default_covers_absence_never_denial() -> None:
    answers = {
        "/v1/task/variables/absent": (404, {"code": "not_found", "message": "no variable"}),
        "/v1/task/variables/denied": (403, {"code": "not_granted", "message": "policy says no"}),
    }
    ctx = context(lambda method, path, body: answers[path])
    assert ctx.get_variable("absent", default="d") == "d"
    with pytest.raises(NotFound):
        ctx.get_variable("absent")
    with pytest.raises(NotPermitted, match="policy says no"):
        ctx.get_variable("denied", default="d")


def test_a_connection_masks_only_what_is_set() -> None:
    bare = Connection(conn_id="c", conn_type="http", host="h")
    assert repr(bare) == (
        "Connection(conn_id='c', conn_type='http', host='h', port=None, login=None, "
        "password=None, schema=None, extra=None)"
    )
    assert bare.extra_dejson == {}
    listed = Connection(conn_id="c", conn_type="http", extra='["secret-ish"]')
    with pytest.raises(ValueError, match="not a JSON object") as err:
        _ = listed.extra_dejson
    garbled = Connection(conn_id="c", conn_type="http", extra="{secret-ish")
    with pytest.raises(ValueError, match="is not JSON") as err2:
        _ = garbled.extra_dejson
    assert "secret-ish" not in str(err.value) + str(err2.value)


def test_public_names_live_in_one_namespace() -> None:
    import privsep.client as client

    for name in client.__all__:
        obj = getattr(client, name)
        if isinstance(obj, type):
            assert obj.__module__ == "privsep.client", name
    assert repr(Workflow("x")) == "<Workflow 'x' (0 tasks)>"
