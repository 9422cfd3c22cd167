"""Where a multi-worker server keeps its metrics: one private directory that every process
writes its values to (``prometheus_client``'s multiprocess mode), set up before any of them
imports ``prometheus_client``. Apart from :mod:`privsep.server.metrics` because that module
imports it: the command line calls this first, then starts the scheduler and the workers.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Final

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess(workers: int) -> str | None:
    """With several workers, a fresh private directory (0700) for every process's values,
    exported in ``PROMETHEUS_MULTIPROC_DIR`` for the workers this process spawns; ``None``
    with one worker. Must run before this process imports ``prometheus_client``, or its own
    values (the scheduler's) would stay in its memory, where no worker's scrape sees them."""
    if workers <= 1 or os.environ.get(MULTIPROC_ENV):
        return None
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prepare_multiprocess must run before prometheus_client is imported")
    directory = tempfile.mkdtemp(prefix="privsep-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    return directory


def remove_multiprocess(directory: str | None) -> None:
    """Remove what :func:`prepare_multiprocess` made, once every worker has exited."""
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
        if os.environ.get(MULTIPROC_ENV) == directory:
            del os.environ[MULTIPROC_ENV]
