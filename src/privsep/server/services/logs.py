"""Central logs: what supervisors ship of their sandboxes' output, stored per work item, read by
operators, and pruned by the scheduler.

A supervisor ships each node-local log file (a *stream*) by byte offset: a chunk says where
in the file it starts, and the server stores only the bytes past what it already holds of that
stream. So a chunk sent twice (its answer was lost, the supervisor restarted between sending
and recording) is acknowledged and not stored twice, and a chunk past the server's end (the
server lost some) is refused with the end, from which the supervisor sends again.
Retention is the scheduler's (:mod:`privsep.server.scheduler.log_retention`).

Who may append: the supervisor a stream was created by, and a stream may be created only by a
supervisor that holds the item or held it once (a ``token_issued`` audit row names it: the
end of a deferred execution is shipped after the attempt has left it). A sandbox token never
reaches the route at all (supervisor scope only).

The text is stored as the sandbox's capture wrote it (control characters already escaped
there); the server neither trusts nor undoes that escaping: whoever shows it escapes it for
its own medium.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exists, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from privsep.server.auth import SupervisorPrincipal
from privsep.server.db.models import (
    AttemptLog,
    AttemptLogChunk,
    AttemptLogStream,
    AttemptState,
    AuditLog,
    ParseJob,
    ParseJobState,
    TaskAttempt,
    utcnow,
)
from privsep.server.errors import bad_request, forbidden, not_found
from privsep.server.metrics import LOG_BYTES_STORED
from privsep.server.routes._sql import for_dialect
from privsep.server.schemas import LogAck, LogChunkIn, LogChunkOut, LogResponse
from privsep.server.state import ServerState

# An attempt in one of these has ended for good (a retry is another attempt).
_ENDED = frozenset(
    {
        AttemptState.SUCCESS,
        AttemptState.FAILED,
        AttemptState.UP_FOR_RETRY,
        AttemptState.SKIPPED,
        AttemptState.UPSTREAM_FAILED,
    }
)

_NEW_LOG = {
    "sqlite": sqlite.insert(AttemptLog).on_conflict_do_nothing(),
    "postgresql": postgresql.insert(AttemptLog).on_conflict_do_nothing(),
}


def truncation_marker(cap: int) -> str:
    return (
        f"\n[privsep: log truncated on the server: this log reached {cap} bytes "
        "(server.log_max_item_bytes)]\n"
    )


def append_chunks(
    state: ServerState, me: SupervisorPrincipal, chunks: Iterable[LogChunkIn]
) -> list[LogAck]:
    """Store one request's chunks (of any number of items) in one transaction: all of them,
    or none when one names a stream the caller may not write (403 ``not_owner``).

    A request carries every running sandbox's output at once, so each step is one statement
    for all of its items, not one per item: the rows are created, locked, read and checked
    in a fixed number of round trips, whatever the batch holds.
    """
    chunks = list(chunks)
    item_ids = sorted({chunk.item_id for chunk in chunks})
    with state.db.write_session() as session:
        now = utcnow()
        logs = _locked_logs(session, chunks, item_ids, now)
        streams = {
            (stream.item_id, stream.stream): stream
            for stream in session.scalars(
                select(AttemptLogStream).where(AttemptLogStream.item_id.in_(item_ids))
            )
        }
        held = _held(session, me, [c for c in chunks if (c.item_id, c.stream) not in streams])
        ends: dict[int, int] = {}
        for index, chunk in enumerate(chunks):
            log = logs[chunk.item_id]
            if log.kind != chunk.kind:
                raise bad_request("wrong_kind", f"{chunk.item_id!r} is a {log.kind} log")
            stream = _own_stream(session, me, chunk, streams, held)
            _apply(log, stream, chunk, session, state.settings.log_max_item_bytes, now)
            ends[index] = stream.end_offset
    return [
        LogAck(item_id=chunk.item_id, stream=chunk.stream, end=ends[index])
        for index, chunk in enumerate(chunks)
    ]


def _locked_logs(
    session: Session, chunks: list[LogChunkIn], item_ids: list[str], now: datetime
) -> dict[str, AttemptLog]:
    """Each item's log row, created if new, locked: appends to one item are serialised (two
    supervisors may write it at once), appends to different items are not. Rows are locked
    in item order whoever sends them (PostgreSQL takes ``FOR UPDATE`` locks in the order the
    sorted rows come), so two supervisors shipping the same two items at once cannot each
    wait for the other's lock."""
    kinds = {chunk.item_id: chunk.kind for chunk in chunks}
    session.execute(
        for_dialect(session, _NEW_LOG),
        [
            {
                "item_id": item_id,
                "kind": kinds[item_id],
                "size_bytes": 0,
                "last_seq": 0,
                "truncated": False,
                "final_execution": 0,
                "created_at": now,
                "updated_at": now,
            }
            for item_id in item_ids
        ],
    )
    rows = session.scalars(
        select(AttemptLog)
        .where(AttemptLog.item_id.in_(item_ids))
        .order_by(AttemptLog.item_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return {log.item_id: log for log in rows}


def _own_stream(
    session: Session,
    me: SupervisorPrincipal,
    chunk: LogChunkIn,
    streams: dict[tuple[str, str], AttemptLogStream],
    held: set[str],
) -> AttemptLogStream:
    key = (chunk.item_id, chunk.stream)
    stream = streams.get(key)
    if stream is not None:
        if stream.supervisor_id != me.supervisor_id:
            raise _not_owner(chunk)
        return stream
    if chunk.item_id not in held:
        raise _not_owner(chunk)
    stream = AttemptLogStream(
        item_id=chunk.item_id,
        stream=chunk.stream,
        supervisor_id=me.supervisor_id,
        end_offset=0,
        final=False,
    )
    session.add(stream)
    streams[key] = stream
    return stream


def _not_owner(chunk: LogChunkIn) -> Exception:
    return forbidden(
        f"the {chunk.kind} {chunk.item_id!r} was never given to this supervisor", "not_owner"
    )


def _held(session: Session, me: SupervisorPrincipal, chunks: list[LogChunkIn]) -> set[str]:
    """Which of the items ``chunks`` name ``me`` holds or held once: the attempt is its now,
    or a work token for the item was issued to it (a ``token_issued`` audit row)."""
    wanted = {chunk.item_id for chunk in chunks}
    if not wanted:
        return set()
    tasks = [chunk.item_id for chunk in chunks if chunk.kind == "task"]
    held = set(
        session.scalars(
            select(TaskAttempt.id).where(
                TaskAttempt.id.in_(tasks), TaskAttempt.supervisor_id == me.supervisor_id
            )
        )
        if tasks
        else ()
    )
    rest = wanted - held
    if rest:
        held.update(
            session.scalars(
                select(AuditLog.subject)
                .where(
                    AuditLog.subject.in_(sorted(rest)),
                    AuditLog.event == "token_issued",
                    AuditLog.actor == me.name,
                )
                .distinct()
            )
        )
    return held


def _apply(
    log: AttemptLog,
    stream: AttemptLogStream,
    chunk: LogChunkIn,
    session: Session,
    cap: int,
    now: datetime,
) -> None:
    """Store the part of ``chunk`` past the stream's end; move the end and the final mark."""
    end = stream.end_offset
    if chunk.offset > end:
        return  # a gap: nothing stored; the answer's end says where to start again
    stop = chunk.offset + chunk.length
    if stop > end:
        data = chunk.text.encode()
        skip = end - chunk.offset
        # Cut where the supervisor cut before (a line or character boundary of the same
        # file), so decoding the rest loses nothing; "ignore" only guards a file that held
        # bytes that are not UTF-8.
        text = data[skip:].decode("utf-8", "ignore") if skip else chunk.text
        _store(session, log, text, cap, now)
        stream.end_offset = stop
        stream.final = False  # the file grew: whatever ended before, this execution writes
    if chunk.final and stop >= stream.end_offset:
        stream.final = True
        log.final_execution = max(log.final_execution, chunk.execution)
        log.updated_at = now


def _store(session: Session, log: AttemptLog, text: str, cap: int, now: datetime) -> None:
    if not text or log.truncated:
        return
    data = text.encode()
    if log.size_bytes + len(data) > cap:
        room = max(0, cap - log.size_bytes)
        text = data[:room].decode("utf-8", "ignore") + truncation_marker(cap)
        data = text.encode()
        log.truncated = True
    log.last_seq += 1
    log.size_bytes += len(data)
    log.updated_at = now
    session.add(AttemptLogChunk(item_id=log.item_id, seq=log.last_seq, text=text))
    LOG_BYTES_STORED.inc(len(data))


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """What the log's completeness depends on: has the item ended, since when, and which
    execution of it is the newest."""

    kind: str | None
    ended: bool
    ended_at: datetime | None
    execution: int


def _item(session: Session, item_id: str) -> _Item | None:
    attempt = session.get(TaskAttempt, item_id)
    if attempt is not None:
        return _Item("task", attempt.state in _ENDED, attempt.ended_at, attempt.execution)
    job = session.get(ParseJob, item_id)
    if job is not None:
        done = job.state in (ParseJobState.SUCCESS, ParseJobState.FAILED)
        return _Item("parse", done, job.finished_at, 0)
    return None


def read_log(state: ServerState, item_id: str, after: int, limit: int) -> LogResponse:
    """One page of ``item_id``'s log: chunks after ``after``, at most ``limit`` of them. A
    404 when neither the item nor a log of it exists."""
    with state.db.read_session() as session:
        log = session.get(AttemptLog, item_id)
        item = _item(session, item_id)
        if log is None and item is None:
            raise not_found(f"no attempt or log {item_id!r}")
        rows = session.execute(
            select(AttemptLogChunk.seq, AttemptLogChunk.text)
            .where(AttemptLogChunk.item_id == item_id, AttemptLogChunk.seq > after)
            .order_by(AttemptLogChunk.seq)
            .limit(limit)
        ).all()
        open_streams = log is not None and bool(
            session.scalar(
                select(
                    exists().where(
                        AttemptLogStream.item_id == item_id, AttemptLogStream.final.is_(False)
                    )
                )
            )
        )
        chunks = [LogChunkOut(seq=row.seq, text=row.text) for row in rows]
        next_seq = chunks[-1].seq if chunks else after
        shipped = _all_shipped(state, log, item, open_streams)
        return LogResponse(
            attempt_id=item_id,
            kind=log.kind if log is not None else (item.kind if item else None),
            chunks=chunks,
            next=next_seq,
            complete=shipped and (log is None or next_seq >= log.last_seq),
            ended=item.ended if item is not None else shipped,
            truncated=bool(log and log.truncated),
            size_bytes=log.size_bytes if log is not None else 0,
        )


def _all_shipped(
    state: ServerState, log: AttemptLog | None, item: _Item | None, open_streams: bool
) -> bool:
    """Whether nothing more will come: the item has ended and every supervisor that wrote it
    said it shipped the end (for a task, of its newest execution too). A supervisor that
    never says so (its node is gone) is waited for as long as a lost supervisor is."""
    if item is None:  # a trigger batch: its supervisor's last chunk is the end
        return log is not None and not open_streams
    if not item.ended:
        return False
    settled = item.ended_at is not None and item.ended_at < utcnow() - timedelta(
        seconds=state.settings.supervisor_heartbeat_timeout
    )
    if settled:
        return True
    final = log.final_execution if log is not None else 0
    return not open_streams and (item.kind != "task" or final >= item.execution)


__all__ = ["append_chunks", "read_log", "truncation_marker"]
