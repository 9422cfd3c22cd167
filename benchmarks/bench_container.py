"""Container backend: launch → user code running and launch → reaped, against raw ``docker run``.

The sandbox runs the same script as ``bench_sandbox``: its first statement connects to its
credential socket and sends a byte, and the clock stops when the benchmark receives it
(user code running). The second figure stops when the handle's status is final: the
container has exited, Docker has reported its exit code and OOM flag, and the container is
removed (reaped). Both go through everything the backend does per sandbox: a pool uid, the
work dir, the plan and status FIFO, ``create`` with every isolation option, attach, start,
the pidfd.

Baselines, measured in the same run on the same image:

* ``docker run --rm --network none IMAGE python3 -c pass``, whole command: what Docker itself
  costs for a container that runs the image's interpreter and is removed;
* the same with ``python3 -I -c 'import os; os.write(1, b"x")'``, to its first byte on stdout.

    python -m benchmarks container
    python -m benchmarks container --smoke

Needs root, a Docker engine and the image (``packaging/container/build-image``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.bench_sandbox import SandboxBench, launch_latencies
from benchmarks.harness import Row, Stats, figure, progress
from privsep.sandbox import UidPool
from privsep.sandbox.container import ContainerBackend
from privsep.sandbox.image import default_image

NAME = "container"
DESCRIPTION = (
    "container sandbox: launch → user code running and launch → reaped, "
    "vs raw docker run --rm of the same image"
)


def docker_run(image: str, n: int) -> tuple[list[float], list[float]]:
    """(``docker run`` → first byte of its python, ``docker run --rm … python3 -c pass``)."""
    first_byte, whole = [], []
    base = ["docker", "run", "--rm", "--network", "none", image]
    for _ in range(n):
        start = time.perf_counter()
        proc = subprocess.Popen(
            [*base, "python3", "-I", "-c", "import os; os.write(1, b'x')"],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        proc.stdout.read(1)
        first_byte.append(time.perf_counter() - start)
        proc.wait()
        start = time.perf_counter()
        subprocess.run([*base, "python3", "-c", "pass"], check=True, capture_output=True)
        whole.append(time.perf_counter() - start)
    return first_byte, whole


def run(smoke: bool) -> list[Row]:
    n, warm = (2, 1) if smoke else (20, 2)
    image = default_image()
    root = Path(tempfile.mkdtemp(prefix="pbc-", dir="/tmp"))
    try:
        bench = SandboxBench(root)
        with ContainerBackend(
            image=image, uid_pool=UidPool(207_950, 32), supervisor="privsep-benchmark"
        ) as backend:
            progress(f"container: {warm} warm-up, then {n} launches")
            launch_latencies(backend, bench, warm, wait_s=60)
            running, reaped = launch_latencies(backend, bench, n, wait_s=60)
        progress(f"container: {n} raw docker run --rm, twice each")
        docker_run(image, warm)
        first_byte, whole = docker_run(image, n)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ms = 1000.0
    base_running = Stats.of([s * ms for s in first_byte])
    base_whole = Stats.of([s * ms for s in whole])
    return [
        figure(
            "container: launch → user code running",
            Stats.of([s * ms for s in running]),
            "ms",
            baseline=base_running,
            baseline_measure="docker run --rm → first byte of its python3",
            note=f"image {image}; {os.cpu_count()} cores",
        ),
        figure(
            "container: launch → reaped (exit read, container removed)",
            Stats.of([s * ms for s in reaped]),
            "ms",
            baseline=base_whole,
            baseline_measure="docker run --rm IMAGE python3 -c pass, whole command",
        ),
    ]
