"""Fixtures for the client SDK's tests: a live server per test and stand-in supervisors on
credential sockets. The machinery is in ``client_kit``."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from client_kit import LiveServer, StandInSupervisor, Work

from privsep.secrets.files import make_private_dir
from privsep.secrets.keyring import create_keyring
from privsep.server.db import sqlite_url_for, upgrade


@pytest.fixture(scope="session")
def _server_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A database migrated to head and a key ring, made once and copied per test."""
    base = tmp_path_factory.mktemp("client-template")
    db_file = base / "template.db"
    upgrade(sqlite_url_for(db_file))
    ring = base / "ring"
    make_private_dir(str(ring))
    create_keyring(str(ring))
    return db_file, ring


@pytest.fixture
def server_factory(
    _server_template: tuple[Path, Path], tmp_path: Path
) -> Iterator[Callable[..., LiveServer]]:
    """Start a fresh live server with settings overrides (e.g. ``work_token_ttl=3``)."""
    started: list[LiveServer] = []

    def start(**overrides: Any) -> LiveServer:
        directory = tmp_path / f"server{len(started)}"
        directory.mkdir()
        server = LiveServer(directory, *_server_template, **overrides)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "server_settings(**overrides): ServerSettings overrides for live_server"
    )


@pytest.fixture
def live_server(
    server_factory: Callable[..., LiveServer], request: pytest.FixtureRequest
) -> LiveServer:
    """A fresh server per test, so no queued item of one test is claimed by another.
    ``@pytest.mark.server_settings(work_token_ttl=3)`` overrides its settings."""
    marker = request.node.get_closest_marker("server_settings")
    return server_factory(**(marker.kwargs if marker else {}))


@pytest.fixture
def credential_socket(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., StandInSupervisor]]:
    """``serve(work, api=None|"tcp"|"unix")``: a stand-in supervisor for ``work``, announced
    to the client in ``PRIVSEP_CREDENTIAL_SOCKET`` (and ``PRIVSEP_API_URL`` for direct
    calls). Serving again replaces the previous one, as a new sandbox would."""
    directory = tempfile.mkdtemp(prefix="psk-", dir="/tmp")
    serving: list[StandInSupervisor] = []

    def serve(work: Work, api: str | None = None, **options: Any) -> StandInSupervisor:
        stand_in = StandInSupervisor(
            live_server, work, f"{directory}/cred{len(serving)}.sock", **options
        )
        serving.append(stand_in)
        monkeypatch.setenv("PRIVSEP_CREDENTIAL_SOCKET", stand_in.path)
        if api is None:
            monkeypatch.delenv("PRIVSEP_API_URL", raising=False)
        else:
            url = {"tcp": live_server.url, "unix": live_server.unix_url}[api]
            monkeypatch.setenv("PRIVSEP_API_URL", url)
        return stand_in

    yield serve
    for stand_in in serving:
        stand_in.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_imports() -> Iterator[None]:
    """Definition files imported in-process (by the parse, task and trigger entry points)
    leave their modules and directories behind; remove them after each test."""
    modules = set(sys.modules)
    path = list(sys.path)
    yield
    for name in set(sys.modules) - modules:
        if hasattr(sys.modules[name], "__privsep_definition__"):
            del sys.modules[name]
    sys.path[:] = path
