"""What the container-backend tests need before they start: a Docker engine and the image.

Imported as a plain module (``tests/`` is on ``sys.path`` through its conftest). Without an
engine or image a test skips, saying what is missing; under ``PRIVSEP_TESTS_STRICT=1``
(``scripts/test`` sets it, and installs and starts both first) it fails instead, so CI never
passes by skipping every container test.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from privsep.sandbox import SandboxUnavailable
from privsep.sandbox.image import BUILD_COMMAND, SOURCE_LABEL, default_image, source_digest


def _unavailable(why: str) -> NoReturn:
    if strict():
        pytest.fail(f"PRIVSEP_TESTS_STRICT=1 and the container tests cannot run: {why}")
    pytest.skip(f"container tests need Docker and the sandbox image: {why}")


def docker_missing() -> str | None:
    """Why the container tests cannot run here (no root, engine or current image), or None."""
    if os.geteuid() != 0:
        return "they run as root (the backend hands files to pool uids)"
    from privsep.sandbox.container import docker_client

    try:
        client = docker_client(timeout=10)
    except SandboxUnavailable as exc:
        return str(exc)
    try:
        import docker.errors

        try:
            info = client.api.inspect_image(default_image())
        except docker.errors.ImageNotFound:
            return f"image {default_image()} is missing; build it with {BUILD_COMMAND}"
        label = (info.get("Config") or {}).get("Labels", {}).get(SOURCE_LABEL)
        if label != source_digest():
            return f"image {default_image()} is out of date; rebuild it with {BUILD_COMMAND}"
    finally:
        client.close()
    return None


def strict() -> bool:
    """``PRIVSEP_TESTS_STRICT=1``: what cannot run is a failure, not a skip."""
    return os.environ.get("PRIVSEP_TESTS_STRICT") == "1"


def require_docker() -> None:
    """Return only if a local engine answers and the current sandbox image is built."""
    why = docker_missing()
    if why is not None:
        _unavailable(why)


def containers_labelled(supervisor: str) -> list[str]:
    """Names of every container (any state) a backend with this supervisor name made."""
    from privsep.sandbox.container import running_containers

    return [str(c["Names"][0]) for c in running_containers(supervisor)]
