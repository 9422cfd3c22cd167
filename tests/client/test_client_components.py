"""The parse, task and trigger entry points end to end against a real server.

Each entry point runs in this test process with ``PRIVSEP_CREDENTIAL_SOCKET`` pointing at a
stand-in supervisor that holds a token from a real claim. That is the client's half of the
chain; running the same entry points in real sandboxes is the supervisor's tests' job.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from client_kit import WORKFLOWS, LiveServer, StandInSupervisor, Work

from privsep.client import _parse, _task, _trigger
from privsep.client._components import ExitCode
from privsep.client._loader import serialize_module

Serve = Callable[..., StandInSupervisor]
ETL = WORKFLOWS / "etl.py"


def parse(server: LiveServer, serve: Serve, path: Path, api: str | None = None) -> Work:
    job = server.queue_parse(path)
    serve(job, api=api)
    assert _parse.run({"path": str(path)}) == ExitCode.OK
    return job


def run_task(serve: Serve, work: Work, path: Path, api: str | None = None) -> None:
    serve(work, api=api)
    payload = {"path": str(path), **work.body["callable"]}
    assert _task.run(payload) == ExitCode.OK


def states(server: LiveServer, run_id: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for attempt in server.attempts(run_id):
        out.setdefault(attempt["task_id"], []).append(attempt["state"])
    return out


def errors(server: LiveServer, run_id: str, task_id: str) -> list[str]:
    return [
        a["error"] or "" for a in server.attempts(run_id) if a["task_id"] == task_id and a["error"]
    ]


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


# --- parse ---------------------------------------------------------------------------------


@pytest.mark.parametrize("api", [None, "unix"], ids=["proxy", "direct-unix"])
def test_parse_submits_every_workflow_as_plain_json(
    live_server: LiveServer, credential_socket: Serve, api: str | None
) -> None:
    path = WORKFLOWS / "shapes.py"
    job = parse(live_server, credential_socket, path, api)
    assert live_server.parse_job_state(job.id) == "success"
    hourly = live_server.stored_definition("shapes_hourly")
    assert hourly == {
        "workflow_id": "shapes_hourly",
        "schedule": "@hourly",
        "tasks": [
            {
                "task_id": "first",
                "upstream": [],
                "retries": 0,
                "retry_delay": 0.0,
                "timeout": None,
                "module": "shapes",
                "qualname": "first",
            },
            {
                "task_id": "second",
                "upstream": ["first"],
                "retries": 3,
                "retry_delay": 30.0,
                "timeout": 12.5,
                "module": "shapes",
                "qualname": "second",
            },
            {
                "task_id": "third-step",
                "upstream": ["first", "second"],
                "retries": 0,
                "retry_delay": 0.0,
                "timeout": None,
                "module": "shapes",
                "qualname": "third",
            },
        ],
    }
    assert live_server.stored_definition("shapes_cron")["schedule"] == "*/5 * * * *"
    every = live_server.stored_definition("shapes_every")
    assert every["schedule"] == 5400.0
    assert [t["upstream"] for t in every["tasks"]] == [["later"], []]
    factory = live_server.stored_definition("shapes_factory")  # never bound to a name
    assert [(t["task_id"], t["qualname"]) for t in factory["tasks"]] == [
        ("step_a", "_factory.<locals>.step"),
        ("step_b", "_factory.<locals>.step"),
    ]
    # Exactly what serialize_module returns, and nothing that is not JSON.
    stored = [live_server.stored_definition(w["workflow_id"]) for w in serialize_module(str(path))]
    assert stored == json.loads(json.dumps(serialize_module(str(path))))


def test_a_syntax_error_is_submitted_as_the_files_parse_error(
    live_server: LiveServer, credential_socket: Serve, tmp_path: Path
) -> None:
    path = write(tmp_path, "broken.py", "from privsep.client import Workflow\ndef f(:\n    pass\n")
    job = parse(live_server, credential_socket, path)
    assert live_server.parse_job_state(job.id) == "failed"
    (message,) = live_server.parse_errors(str(path))
    assert "SyntaxError" in message
    assert f'File "{path}", line 2' in message
    assert "def f(:" in message
    assert "privsep/client" not in message
    assert "importlib" not in message


def test_an_exception_at_import_is_a_parse_error_with_a_clean_traceback(
    live_server: LiveServer, credential_socket: Serve, tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        "raises.py",
        """\
        from privsep.client import Workflow

        wf = Workflow("never_stored")

        def helper():
            raise RuntimeError("kaboom at import")

        helper()
        """,
    )
    parse(live_server, credential_socket, path)
    (message,) = live_server.parse_errors(str(path))
    lines = message.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: kaboom at import"
    assert f'File "{path}", line 8, in <module>' in message
    assert f'File "{path}", line 6, in helper' in message
    assert "_loader.py" not in message
    assert "<frozen" not in message


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            """\
            from privsep.client import Workflow
            wf = Workflow("cyclic")
            wf.task(task_id="a", upstream=["b"])(lambda ctx: None)
            wf.task(task_id="b", upstream=["c"])(lambda ctx: None)
            wf.task(task_id="c", upstream=["a"])(lambda ctx: None)
            """,
            "DefinitionError: workflow 'cyclic' has a dependency cycle: a -> b -> c -> a",
        ),
        (
            """\
            from privsep.client import Workflow
            one = Workflow("same")
            two = Workflow("same")
            """,
            "defines the workflow id 'same' twice",
        ),
        (
            """\
            from privsep.client import Workflow
            wf = Workflow("dangling")
            wf.task(task_id="t", upstream=["nowhere"])(lambda ctx: None)
            """,
            "names an unknown upstream task 'nowhere'",
        ),
        (
            """\
            from privsep.client import Workflow
            wf = Workflow("bad options")
            """,
            "ValueError: workflow id 'bad options' must be",
        ),
        (
            """\
            import sys
            sys.exit("the file gave up")
            """,
            "SystemExit: the file gave up",
        ),
    ],
    ids=["cycle", "duplicate-id", "unknown-upstream", "bad-id", "sys-exit"],
)
def test_invalid_definitions_are_parse_errors(
    live_server: LiveServer, credential_socket: Serve, tmp_path: Path, source: str, expected: str
) -> None:
    path = write(tmp_path, "invalid.py", source)
    parse(live_server, credential_socket, path)
    (message,) = live_server.parse_errors(str(path))
    assert expected in message


def test_parse_entry_point_takes_the_sandbox_calling_convention(
    live_server: LiveServer, credential_socket: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    job = live_server.queue_parse(ETL)
    credential_socket(job)
    assert _parse.main([], json.dumps({"path": f"file://{ETL}"}).encode()) == ExitCode.OK
    assert live_server.stored_definition("etl")["tasks"][1]["retries"] == 2
    assert _parse.main([], b"not json") == ExitCode.BAD_PAYLOAD
    assert _parse.main([], b"{}") == ExitCode.BAD_PAYLOAD
    assert "privsep parse: the payload needs" in capsys.readouterr().err


def test_entry_points_outside_a_sandbox_exit_with_a_named_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PRIVSEP_CREDENTIAL_SOCKET", raising=False)
    assert _parse.run({"path": str(ETL)}) == ExitCode.NOT_IN_SANDBOX
    assert _task.run({"path": str(ETL), "qualname": "extract"}) == ExitCode.NOT_IN_SANDBOX
    assert _trigger.run({}) == ExitCode.NOT_IN_SANDBOX
    err = capsys.readouterr().err
    assert err.count("not running in a privsep sandbox") == 3
    assert ExitCode.NOT_IN_SANDBOX.message.startswith("no credential socket")


def test_a_result_the_server_cannot_take_is_reported_not_raised(
    live_server: LiveServer, credential_socket: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    job = live_server.queue_parse(ETL)
    credential_socket(job)
    assert _parse.run({"path": str(ETL)}) == ExitCode.OK
    # The job is finished: the same token cannot submit again, and the exit code says so.
    assert _parse.run({"path": str(ETL)}) == ExitCode.API_FAILED
    assert "cannot submit the parse result" in capsys.readouterr().err


# --- task and trigger ------------------------------------------------------------------------


def grant_etl(server: LiveServer) -> None:
    server.grant("etl", "variable", "etl_*")
    server.grant("etl", "connection", "warehouse")
    server.put_variable("etl_target", "facts")
    server.put_connection("warehouse", conn_type="postgres", host="db", password="s3cret")


@pytest.mark.parametrize("api", [None, "tcp"], ids=["proxy", "direct-tcp"])
def test_the_etl_example_runs_end_to_end(
    live_server: LiveServer,
    credential_socket: Serve,
    api: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    parse(live_server, credential_socket, ETL, api)
    grant_etl(live_server)
    run_id = live_server.trigger_run("etl")

    for expected in ("extract", "load", "wait_then_finish"):
        work = live_server.claim("task")
        assert work.body["task_id"] == expected
        run_task(credential_socket, work, ETL, api)
    assert states(live_server, run_id) == {
        "extract": ["success"],
        "load": ["success"],
        "wait_then_finish": ["deferred"],
    }
    assert live_server.xcom(run_id, "extract") == {"rows": 3}
    assert live_server.xcom(run_id, "load") == 3

    batch = live_server.claim("trigger")
    credential_socket(batch, api=api)
    assert _trigger.run({"paths": [str(ETL)]}) == ExitCode.OK

    resumed = live_server.claim("task")
    assert resumed.body["task_id"] == "wait_then_finish"
    assert resumed.body["try_number"] == 1
    run_task(credential_socket, resumed, ETL, api)
    assert live_server.xcom(run_id, "wait_then_finish") == 1.0
    assert live_server.run_state(run_id) == "success"

    (loading,) = [r for r in caplog.records if r.name == "privsep.task.etl.load"]
    assert loading.getMessage().startswith("loading 3 rows into facts on Connection(")
    assert "s3cret" not in caplog.text


def test_without_the_grant_load_fails_with_not_permitted_and_extract_is_unaffected(
    live_server: LiveServer, credential_socket: Serve
) -> None:
    parse(live_server, credential_socket, ETL)
    live_server.put_connection("warehouse", conn_type="postgres", host="db")
    run_id = live_server.trigger_run("etl")
    run_task(credential_socket, live_server.claim("task"), ETL)  # extract
    run_task(credential_socket, live_server.claim("task"), ETL)  # load, try 1
    assert states(live_server, run_id)["extract"] == ["success"]
    assert states(live_server, run_id)["load"] == ["up_for_retry", "queued"]  # retries=2
    (error, *_) = errors(live_server, run_id, "load")
    # A denial is never quietly the default: get_variable(..., default="t") raises.
    assert error.splitlines()[-1] == (
        "privsep.client.NotPermitted: GET /v1/task/variables/etl_target: policy grants "
        "workflow 'etl' no access to this variable (HTTP 403, code 'not_granted')"
    )
    assert 'etl.py", line 16, in load' in error


def test_a_raising_task_is_retried_then_failed_and_a_non_json_value_fails(
    live_server: LiveServer, credential_socket: Serve
) -> None:
    path = WORKFLOWS / "failing.py"
    parse(live_server, credential_socket, path)
    run_id = live_server.trigger_run("failing")
    by_task = {}
    for _ in range(2):
        work = live_server.claim("task")
        by_task[work.body["task_id"]] = work
    run_task(credential_socket, by_task["boom"], path)
    run_task(credential_socket, by_task["not_json"], path)
    retry = live_server.claim("task")
    assert (retry.body["task_id"], retry.body["try_number"]) == ("boom", 2)
    run_task(credential_socket, retry, path)

    assert states(live_server, run_id) == {
        "boom": ["up_for_retry", "failed"],
        "not_json": ["failed"],
    }
    first, second = errors(live_server, run_id, "boom")
    assert first.splitlines()[-1] == "RuntimeError: boom on try 1"
    assert second.splitlines()[-1] == "RuntimeError: boom on try 2"
    assert "privsep/client" not in first
    (not_json,) = errors(live_server, run_id, "not_json")
    assert "returned a value that is not JSON-serializable" in not_json


def test_a_task_whose_definition_changed_is_reported_not_run(
    live_server: LiveServer, credential_socket: Serve, tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        "moving.py",
        """\
        from privsep.client import Workflow
        wf = Workflow("moving")
        @wf.task
        def only(ctx):
            return 1
        """,
    )
    parse(live_server, credential_socket, path)
    run_id = live_server.trigger_run("moving")
    work = live_server.claim("task")
    path.write_text(path.read_text().replace("def only", "def renamed"))
    run_task(credential_socket, work, path)
    (error,) = errors(live_server, run_id, "only")
    assert "no longer declares task moving.only" in error


def test_triggers_run_concurrently_and_each_outcome_is_reported(
    live_server: LiveServer, credential_socket: Serve
) -> None:
    path = WORKFLOWS / "triggers.py"
    parse(live_server, credential_socket, path)
    run_id = live_server.trigger_run("trig")
    for _ in range(2):
        run_task(credential_socket, live_server.claim("task"), path)
    assert states(live_server, run_id) == {
        "park_on_quick": ["deferred"],
        "park_on_explode": ["deferred"],
    }
    batch = live_server.claim("trigger")
    assert len(batch.body["trigger_ids"]) == 2  # one sandbox, one event loop
    credential_socket(batch)
    assert _trigger.run({"paths": [str(path)]}) == ExitCode.OK

    assert states(live_server, run_id) == {
        "park_on_quick": ["queued"],
        "park_on_explode": ["failed"],
    }
    (error,) = errors(live_server, run_id, "park_on_explode")
    assert error.startswith("trigger failed: Traceback")
    assert error.splitlines()[-1] == "ValueError: trigger went bang"

    resumed = live_server.claim("task")
    run_task(credential_socket, resumed, path)
    assert live_server.xcom(run_id, "park_on_quick") == {"value": 7, "extra": {"colour": "blue"}}


def test_a_trigger_class_that_cannot_be_imported_fails_its_task(
    live_server: LiveServer, credential_socket: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = WORKFLOWS / "triggers.py"
    parse(live_server, credential_socket, path)
    run_id = live_server.trigger_run("trig")
    for _ in range(2):
        run_task(credential_socket, live_server.claim("task"), path)
    credential_socket(live_server.claim("trigger"))
    # As in a fresh trigger sandbox given no definition files: "triggers" is not importable.
    monkeypatch.delitem(sys.modules, "triggers")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(WORKFLOWS)])
    assert _trigger.run({"paths": []}) == ExitCode.OK
    for task_id in ("park_on_quick", "park_on_explode"):
        (error,) = errors(live_server, run_id, task_id)
        assert "cannot import trigger class triggers:" in error


def test_trigger_payload_must_list_paths(capsys: pytest.CaptureFixture[str]) -> None:
    assert _trigger.run({"paths": "etl.py"}) == ExitCode.BAD_PAYLOAD
    assert _task.run({"qualname": "x"}) == ExitCode.BAD_PAYLOAD
    assert "privsep trigger" in capsys.readouterr().err


def test_an_async_task_is_run_to_completion(
    live_server: LiveServer, credential_socket: Serve, tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        "asyncwf.py",
        """\
        import asyncio
        from privsep.client import Workflow
        wf = Workflow("asyncwf")
        @wf.task
        async def fetch(ctx):
            await asyncio.sleep(0)
            return {"try": ctx.try_number}
        """,
    )
    parse(live_server, credential_socket, path)
    run_id = live_server.trigger_run("asyncwf")
    run_task(credential_socket, live_server.claim("task"), path)
    assert live_server.xcom(run_id, "fetch") == {"try": 1}
