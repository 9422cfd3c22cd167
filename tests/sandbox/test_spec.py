"""SandboxSpec refuses what must never reach a child, with a message that says why."""

from __future__ import annotations

import pytest

from privsep.sandbox import Limits, SandboxSpec

OK = {"kind": "task", "entry_point": "privsep.sandbox.entrypoints:run_path", "workdir": "/w/1"}


def test_valid_spec_is_frozen_and_env_is_read_only() -> None:
    spec = SandboxSpec(**OK, env={"PATH": "/usr/bin"})  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        spec.kind = "parse"  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.env["X"] = "1"  # type: ignore[index]
    assert spec.limits == Limits()
    assert len(spec.sandbox_id) == 16


@pytest.mark.parametrize(
    "name", ["NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "CREDENTIALS_DIRECTORY", "PRIVSEP__X"]
)
def test_supervisor_only_variables_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"environment variable {name} may never be passed"):
        SandboxSpec(**OK, env={name: "1"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("entry_point", "os:system", "entry_point must be 'privsep.module:function'"),
        ("entry_point", "privsep.x", "entry_point must be"),
        ("workdir", "relative/dir", "workdir must be an absolute path"),
        ("workdir", "/a/../etc", "workdir must be normalized"),
        ("workdir", "/", "workdir may not be '/'"),
        ("kind", "daemon", "kind must be one of parse, trigger, task"),
        ("network", "bridge", "network must be none or host"),
        ("sandbox_id", "../x", "is not a safe identifier"),
    ],
)
def test_bad_fields_are_refused(field: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SandboxSpec(**{**OK, field: value})  # type: ignore[arg-type]


def test_parse_never_gets_the_network() -> None:
    with pytest.raises(ValueError, match="a parse sandbox never gets the network"):
        SandboxSpec(**{**OK, "kind": "parse"}, network="host")  # type: ignore[arg-type]


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match=r"limits\.wall_seconds must be positive"):
        Limits(wall_seconds=0)
    with pytest.raises(ValueError, match=r"limits\.pids must be at least 1"):
        Limits(pids=0)
    assert Limits(cpu_seconds=3).to_wire()["cpu_seconds"] == 3
    assert "cpu_seconds" not in Limits().to_wire()


def test_the_image_carries_every_privsep_module_its_files_import() -> None:
    """A module the client or the entry code imports but the image lacks fails only inside a
    container, at the first parse: catch it here, from the files' own import statements."""
    import ast

    from privsep.sandbox.image import package_parent, source_files

    listed = set(source_files())
    missing = set()
    for name in listed:
        tree = ast.parse((package_parent() / name).read_text())
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            modules = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            for module in modules:
                if module == "privsep" or not module.startswith("privsep."):
                    continue
                path = module.replace(".", "/")
                if f"{path}.py" not in listed and f"{path}/__init__.py" not in listed:
                    missing.add(f"{name} imports {module}")
    assert not missing, sorted(missing)
