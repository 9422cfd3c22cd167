"""The hostile-child suite: real sandboxes, as root, through the real backend.

Before any backend starts, the "supervisor" (this pytest process) plants a secret where a
careless sandbox would leak it: in its environment (also under the names systemd and privsep
use), in its memory, and in an inheritable open fd. Every attack then runs in a real child and
reports what it could reach; the tests assert the safe outcome. After every test a canary
sandbox must still run normally.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_kit import RUN_PATH, SECRET, Hostile

from privsep.sandbox import ExitReason, ProcessBackend, SandboxSpec, UidPool

SUPERVISOR_ONLY_NAMES = (
    "PRIVSEP_PLANTED_SECRET",
    "PRIVSEP__SUPERVISOR__CREDENTIAL",
    "NOTIFY_SOCKET",
    "CREDENTIALS_DIRECTORY",
    "LISTEN_FDS",
    "WATCHDOG_USEC",
)


@pytest.fixture(scope="session")
def planted_secret(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """An inheritable fd on a secret file, open before any backend (or zygote) starts."""
    secret_file = tmp_path_factory.mktemp("supervisor") / "supervisor.key"
    secret_file.write_bytes(SECRET)
    secret_file.chmod(0o600)
    fd = os.open(secret_file, os.O_RDONLY)
    os.set_inheritable(fd, True)  # a careless supervisor: this fd survives exec
    yield fd
    os.close(fd)


@pytest.fixture(autouse=True)
def planted_environment(monkeypatch: pytest.MonkeyPatch, planted_secret: int) -> None:
    """The secret in the supervisor's environment while each attack runs (and only then)."""
    for name in SUPERVISOR_ONLY_NAMES:
        monkeypatch.setenv(name, SECRET.decode())


@pytest.fixture(scope="session")
def template_backend(planted_secret: int) -> Iterator[ProcessBackend]:
    with ProcessBackend(launch_mode="template", uid_pool=UidPool(210_000, 64)) as backend:
        yield backend


@pytest.fixture(scope="session")
def spawn_backend(planted_secret: int) -> Iterator[ProcessBackend]:
    with ProcessBackend(launch_mode="spawn", uid_pool=UidPool(211_000, 64)) as backend:
        yield backend


@pytest.fixture(params=["template", "spawn"])
def any_backend(
    request: pytest.FixtureRequest,
    template_backend: ProcessBackend,
    spawn_backend: ProcessBackend,
) -> ProcessBackend:
    """For the attacks that depend on how the child was started: run them in both modes."""
    return template_backend if request.param == "template" else spawn_backend


@pytest.fixture
def workroot(tmp_path: Path) -> Path:
    """A directory the sandbox uid may traverse (pytest's tmp_path is 0700)."""
    os.chmod(tmp_path, 0o755)
    return tmp_path


@pytest.fixture
def hostile(template_backend: ProcessBackend, workroot: Path) -> Hostile:
    return Hostile(template_backend, workroot)


@pytest.fixture
def hostile_any(any_backend: ProcessBackend, workroot: Path) -> Hostile:
    return Hostile(any_backend, workroot)


@pytest.fixture(autouse=True)
def next_sandbox_runs_normally(
    request: pytest.FixtureRequest, template_backend: ProcessBackend, tmp_path: Path
) -> Iterator[None]:
    """After every attack, the supervisor is healthy and an ordinary sandbox succeeds."""
    yield
    canary = tmp_path / "canary"
    canary.mkdir(mode=0o755, exist_ok=True)
    script = canary / "canary.py"
    script.write_text("print('canary ok')\n")
    script.chmod(0o644)
    os.chmod(tmp_path, 0o755)
    handle = template_backend.launch(
        SandboxSpec(
            kind="task",
            entry_point=RUN_PATH,
            argv=(str(script),),
            workdir=str(tmp_path / "canary-work"),
            bundle_paths=(str(canary),),
        )
    )
    status = handle.wait(30)
    assert status is not None and status.reason is ExitReason.SUCCEEDED, (
        f"after {request.node.name}: {status}\n{handle.output().text}"
    )
    assert handle.output().text == "canary ok\n"
