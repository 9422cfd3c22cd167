"""The parse figures of the end-to-end benchmark: definition files parsed in sandboxes
through the API, and the same parse-and-sync in-process with a direct database session (the
floor the isolation overhead is measured against)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.e2e_system import SMALL, Standalone, timestamp, write_atomically
from benchmarks.harness import progress


@dataclass
class ParseRound:
    files: list[Path]  # the sources, outside the workflows folder
    wall_s: float = 0.0
    cpu_s: float = 0.0


def make_parse_rounds(root: Path, files_per_round: int, round_count: int) -> list[ParseRound]:
    rounds = []
    for index in range(round_count):
        folder = root / "parse-src" / f"r{index}"
        folder.mkdir(parents=True)
        sources = [
            write_atomically(
                folder, f"p{index}_{n:04d}.py", SMALL.format(workflow_id=f"p{index}_{n:04d}")
            )
            for n in range(files_per_round)
        ]
        rounds.append(ParseRound(sources))
    return rounds


def measure_parse_sandboxed(system: Standalone, rounds: list[ParseRound]) -> None:
    from sqlalchemy import select

    from privsep.server.db.models import ParseJob, ParseJobState, Workflow

    done_states = (ParseJobState.SUCCESS, ParseJobState.FAILED)
    for index, parse_round in enumerate(rounds):
        progress(
            f"parse round {index + 1}/{len(rounds)}: {len(parse_round.files)} files, sandboxed"
        )
        cpu_before = system.cpu.seconds()
        placed = [
            write_atomically(system.workflows, src.name, src.read_text())
            for src in parse_round.files
        ]
        start = time.time()
        since = datetime.fromtimestamp(start - 5, UTC)
        uris = {p.resolve().as_uri() for p in placed}
        deadline = time.monotonic() + 60 + len(placed)
        while True:
            system.check_alive()
            with system.db.read_session() as session:
                jobs = session.execute(
                    select(ParseJob.uri, ParseJob.state, ParseJob.finished_at).where(
                        ParseJob.created_at >= since
                    )
                ).all()
            # A job's URI may carry a "#sha256=..." pin after the file's URI.
            finished = {
                j.uri.split("#", 1)[0]: j
                for j in jobs
                if j.state in done_states and j.uri.split("#", 1)[0] in uris
            }
            if len(finished) == len(uris):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(uris) - len(finished)} files not parsed in time\n{system.output()}"
                )
            time.sleep(0.1)
        failed = [j.uri for j in finished.values() if j.state != ParseJobState.SUCCESS]
        if failed:
            raise RuntimeError(f"parse jobs failed: {failed[:3]}\n{system.output()}")
        parse_round.cpu_s = system.cpu.seconds() - cpu_before
        parse_round.wall_s = max(timestamp(j.finished_at) for j in finished.values()) - start
        progress(f"  {parse_round.wall_s / len(placed) * 1e3:.1f} ms per file")
        # Take the files away again, so every round starts from the same folder.
        ids = [p.stem for p in placed]
        for path in placed:
            path.unlink()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with system.db.read_session() as session:
                still = session.scalars(
                    select(Workflow.id).where(Workflow.id.in_(ids), Workflow.active)
                ).first()
            if still is None:
                break
            time.sleep(0.1)


# --- the direct path: parse and sync in-process, no sandbox, no API ---------------------------

_direct: dict[str, Any] = {}


def _direct_init(url: str, supervisor_id: str) -> None:
    """Pool worker start: a database engine and what the handler needs, imported once."""
    from privsep.client._loader import serialize_module
    from privsep.server.auth import ParsePrincipal
    from privsep.server.db import Database
    from privsep.server.db.models import ParseJob, ParseJobState, utcnow
    from privsep.server.schemas import ParseResultRequest
    from privsep.server.services.parse_results import store_result

    db = Database.from_url(url)

    class _State:  # the handler reads only ``state.db``
        pass

    state = _State()
    state.db = db  # type: ignore[attr-defined]
    _direct.update(
        db=db,
        state=state,
        supervisor_id=supervisor_id,
        serialize_module=serialize_module,
        ParsePrincipal=ParsePrincipal,
        ParseJob=ParseJob,
        ParseJobState=ParseJobState,
        utcnow=utcnow,
        store_result=store_result,
        ParseResultRequest=ParseResultRequest,
    )


def _direct_parse_and_sync(path: str) -> float:
    """What the API path does for one file, minus the sandbox, the HTTP and the tokens: queue
    the job, claim it, import the file, validate and store the result with the same handler.
    Returns the CPU seconds it took in this worker."""
    d = _direct
    cpu = time.process_time()
    with d["db"].write_session() as session:  # POST /v1/supervisor/parse-jobs
        job = d["ParseJob"](uri=Path(path).as_uri(), content_hash=None, bundle_version="")
        session.add(job)
        session.flush()
        job_id = job.id
    with d["db"].write_session() as session:  # POST /v1/supervisor/claim
        job = session.get(d["ParseJob"], job_id)
        job.state = d["ParseJobState"].RUNNING
        job.supervisor_id = d["supervisor_id"]
        job.claimed_at = d["utcnow"]()
    workflows = d["serialize_module"](path)  # the parse sandbox's import
    # As JSON, as the API receives it.
    body = d["ParseResultRequest"].model_validate_json(json.dumps({"workflows": workflows}))
    d["store_result"](d["state"], d["ParsePrincipal"](job_id, d["supervisor_id"]), body)
    return time.process_time() - cpu


def measure_parse_direct(
    root: Path, rounds: list[ParseRound], parallelism: int
) -> tuple[list[float], list[float]]:
    """Wall seconds and CPU seconds of each round, parsed and synced in-process by
    ``parallelism`` forked workers into a fresh migrated database."""
    import multiprocessing

    from privsep.server.db import Database, sqlite_url_for, upgrade
    from privsep.server.db.models import Supervisor

    url = sqlite_url_for(root / "direct" / "direct.db")
    (root / "direct").mkdir()
    upgrade(url)
    db = Database.from_url(url)
    try:
        with db.write_session() as session:
            sup = Supervisor(name="direct", public_key_pem="-")
            session.add(sup)
            session.flush()
            supervisor_id = sup.id
    finally:
        db.dispose()
    warm = root / "direct" / "warm"
    warm.mkdir()
    warm_files = [
        str(write_atomically(warm, f"w_{n}.py", SMALL.format(workflow_id=f"w_{n}")))
        for n in range(parallelism * 2)
    ]
    walls: list[float] = []
    cpus: list[float] = []
    with ProcessPoolExecutor(
        max_workers=parallelism,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_direct_init,
        initargs=(url, supervisor_id),
    ) as pool:
        list(pool.map(_direct_parse_and_sync, warm_files))
        for index, parse_round in enumerate(rounds):
            progress(f"parse round {index + 1}/{len(rounds)}: in-process, direct DB session")
            start = time.perf_counter()
            cpu = sum(pool.map(_direct_parse_and_sync, [str(p) for p in parse_round.files]))
            walls.append(time.perf_counter() - start)
            cpus.append(cpu)
    return walls, cpus
