"""The part of the Docker SDK the container backend uses, as types mypy can check.

The SDK ships no type information, so every call on it would be ``Any``: a misspelt method or a
wrong argument would pass the type check and fail only against a live engine. These protocols
name exactly the calls the backend and its handles make; the SDK's ``APIClient`` and
``DockerClient`` satisfy them as they are. Docker's answers are decoded JSON and stay
``dict[str, Any]``: their shape is Docker's, checked where they are read.

:func:`docker_client` is here too, since it is the one place an SDK client is made.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol

from privsep.sandbox.errors import SandboxUnavailable

DOCKER_TIMEOUT = 60
JSON = dict[str, Any]


class DockerSocket(Protocol):
    """The raw attach stream ``attach_socket`` returns."""

    def fileno(self) -> int: ...
    def close(self) -> None: ...


class DockerAPI(Protocol):
    """The low-level engine API (``docker.APIClient``) calls the backend makes."""

    base_url: str

    def inspect_image(self, image: str) -> JSON: ...
    def containers(self, *, all: bool, filters: Mapping[str, str]) -> list[JSON]: ...
    def remove_container(self, container: str, *, force: bool) -> None: ...
    def create_host_config(self, **options: object) -> JSON: ...
    def create_container(self, image: str, **options: object) -> JSON: ...
    def attach_socket(self, container: str, params: Mapping[str, int]) -> DockerSocket: ...
    def start(self, container: str) -> None: ...
    def inspect_container(self, container: str) -> JSON: ...
    def wait(self, container: str, *, timeout: int) -> JSON: ...


class DockerClient(Protocol):
    """The high-level client (``docker.DockerClient``): only its API and its lifetime."""

    api: DockerAPI

    def ping(self) -> bool: ...
    def close(self) -> None: ...


def docker_client(timeout: int = DOCKER_TIMEOUT) -> DockerClient:
    """A Docker SDK client for the local engine, or :class:`SandboxUnavailable` in one line.

    Only a local engine (a unix socket) will do: the backend bind-mounts host paths and holds
    a pidfd on each container's PID 1, both of which must be on this host.
    """
    try:
        import docker
    except ImportError:
        raise SandboxUnavailable(
            "privsep: the container backend needs the Docker SDK: pip install 'privsep[container]'"
        ) from None
    try:
        client: DockerClient = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as exc:
        where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        raise SandboxUnavailable(
            f"privsep: no Docker engine answers at {where} ({one_line(exc)}); "
            "start dockerd, or set DOCKER_HOST"
        ) from None
    if not str(client.api.base_url).startswith("http+docker://"):
        client.close()
        raise SandboxUnavailable(
            f"privsep: the container backend needs a local Docker engine on a unix socket, "
            f"not {client.api.base_url}: it mounts host paths and watches host pids"
        )
    return client


def one_line(exc: BaseException) -> str:
    """The last line of an SDK error (they carry whole HTTP bodies), cut to fit a log line."""
    text = str(exc).strip().splitlines()
    return text[-1][:300] if text else type(exc).__name__
