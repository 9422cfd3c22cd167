"""Shipping every sandbox's output to the server's central logs while it is written.

The node-local log file (``state/logs/<kind>-<id>.log``, written by the sandbox backend's
capture, escaped and capped there) is the spool: nothing is held in memory but one request's
worth. A thread of its own reads what each file gained since the last acknowledged byte and
sends it, every :data:`SHIP_INTERVAL` seconds or at once when more is waiting, all running
sandboxes' output in one request (a chunk of at most :data:`CHUNK_BYTES` per file, at most
:data:`REQUEST_BYTES` per request), so a chatty task costs a request per interval, not one
per line. A down server does not slow the supervisor's loop: the thread backs off (up to
:data:`RETRY_MAX`), the files keep growing on disk, and it all goes once the server answers.

Nothing is lost and nothing is stored twice, across restarts too. Each file is a *stream* with
an id made when the file is first written, and each chunk names the byte offset it starts at.
The server stores only the bytes past what it holds of that stream and answers how far it
holds it; that end is recorded per file in ``state/logship/<kind>-<id>.json`` (rewritten in
place by a single write, see :meth:`LogShipper._write_record`), never ahead of the server. A
supervisor killed between the server's answer and the record sends those bytes again, and
the server acknowledges them without storing them. The last chunk of an execution (after
its sandbox ended) is marked ``final`` with the attempt's execution number, which is how the
server knows the log is complete.
A supervisor restarted with records that never got their final chunk ships the rest of
those files (their sandboxes died with the previous process) and marks them final.

A file that already holds an earlier execution's output (a deferred task resumed here) is
appended to, after a separator line, and keeps its stream: one log per item, in order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privsep.runner.api.session import ApiRefused, ServerUnavailable, SupervisorApi
from privsep.runner.supervisor import metrics
from privsep.runner.supervisor.inplace import rewrite_in_place

log = logging.getLogger("privsep.supervisor")

SHIP_INTERVAL = 0.25
CHUNK_BYTES = 65_536  # the server's LogChunkIn limit
REQUEST_BYTES = 262_144  # well under server.max_request_bytes once JSON-escaped
CHUNKS_PER_REQUEST = 100  # the server's LogAppendRequest limit
RETRY_MIN = 0.5
RETRY_MAX = 10.0
ROUTE = "/v1/supervisor/logs"


def mark_resumed(path: str, now: float) -> None:
    """Before an item runs again in a log file that holds an earlier execution's output: end
    that output's last line and add a separator, so the one log reads in order."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # a new file: the backend creates it
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return
        newline = os.pread(fd, 1, size - 1) == b"\n"
        stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
        os.write(fd, f"{'' if newline else chr(10)}[privsep: resumed at {stamp}]\n".encode())
    finally:
        os.close(fd)


@dataclass
class _Log:
    """One node-local log file and how much of it the server holds."""

    kind: str
    item_id: str
    path: str
    stream: str
    shipped: int = 0
    execution: int = 0
    ended: bool = False  # its sandbox ended: ship to the end, then say final
    done: bool = False  # the server has the end and the final mark
    opened: int = 0  # bumped by each execution: a final answer of the previous one is stale
    pending_since: float | None = None  # when bytes past ``shipped`` were first seen
    alone: bool = False  # its batch was refused: sent alone next, to find out which

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.item_id}"

    def record(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "item_id": self.item_id,
            "path": self.path,
            "stream": self.stream,
            "shipped": self.shipped,
            "execution": self.execution,
            "done": self.done,
        }


@dataclass(frozen=True)
class _Chunk:
    log: _Log
    opened: int
    offset: int
    length: int
    text: str
    final: bool

    def body(self) -> dict[str, Any]:
        return {
            "kind": self.log.kind,
            "item_id": self.log.item_id,
            "stream": self.log.stream,
            "offset": self.offset,
            "length": self.length,
            "text": self.text,
            "final": self.final,
            "execution": self.log.execution,
        }


def _decoded(data: bytes, final: bool) -> tuple[str, int]:
    """The longest prefix of ``data`` that is whole UTF-8, and its length in bytes. A
    character cut by the read waits for its rest (unless the file is at its end); a byte that
    is not UTF-8 at all (the capture writes none) goes as a backslash escape."""
    try:
        return data.decode(), len(data)
    except UnicodeDecodeError as exc:
        if exc.start > 0:
            return data[: exc.start].decode(), exc.start
        if exc.reason == "unexpected end of data" and not final:
            return "", 0
        return data[: exc.end].decode("utf-8", "backslashreplace"), exc.end


class LogShipper:
    """Ships the node's log files to the server from a thread of its own (see the module
    docstring). :meth:`opened` and :meth:`closed` are called by the loop; they only note."""

    def __init__(self, api: SupervisorApi, records_dir: Path, *, interval: float = SHIP_INTERVAL):
        self._api = api
        self._dir = records_dir
        self._interval = interval
        self._logs: dict[str, _Log] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._delay = 0.0  # backoff while the server is away
        self._unavailable = ""
        self._thread = threading.Thread(target=self._run, name="privsep-logship", daemon=True)

    # --- the loop's side ----------------------------------------------------------------------

    def start(self) -> None:
        """Take up the records an earlier process left unfinished, then start shipping."""
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in sorted(self._dir.glob("*.json")):
            entry = self._read_record(path)
            if entry is not None and not entry.done:
                entry.ended = True  # its sandbox died with the previous process
                self._logs[entry.name] = entry
        if self._logs:
            log.info("shipping the rest of %d logs from before the restart", len(self._logs))
        self._thread.start()

    def opened(self, kind: str, item_id: str, path: str, execution: int) -> None:
        """A sandbox started writing ``path``. A file that already feeds a stream (an
        earlier execution here) keeps it; otherwise a new stream starts at byte 0."""
        name = f"{kind}-{item_id}"
        with self._lock:
            entry = self._logs.get(name) or self._read_record(self._dir / f"{name}.json")
            if entry is None or entry.path != path or _size(path) < entry.shipped:
                entry = _Log(kind, item_id, path, uuid.uuid4().hex)
            entry.execution = execution
            entry.ended = entry.done = False
            entry.opened += 1
            self._logs[name] = entry
            self._write_record(entry)  # the stream id is on disk before any byte is shipped

    def closed(self, kind: str, item_id: str) -> None:
        """Its sandbox ended: the rest of the file goes at the next interval, marked final.

        Not at once: under load sandboxes end many times an interval, and waking for each
        sent one request (one write transaction on the server) per item. Waiting for the
        interval sends all of them in one, for at most :data:`SHIP_INTERVAL` of delay.
        """
        with self._lock:
            entry = self._logs.get(f"{kind}-{item_id}")
            if entry is not None:
                entry.ended = True

    def unshipped(self) -> set[str]:
        """Paths of the files the server does not hold all of yet (local retention keeps them)."""
        with self._lock:
            return {entry.path for entry in self._logs.values()}

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after one last try to ship everything (what is left goes after a restart)."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def prune(self, logs_dir: Path, max_age: float, now: float) -> None:
        """Local retention: delete log files (and their records) older than ``max_age``
        seconds, except those the server does not hold all of yet."""
        keep = self.unshipped()
        cutoff = now - max_age
        for entry in os.scandir(logs_dir):
            try:
                if (
                    entry.is_file(follow_symlinks=False)
                    and entry.path not in keep
                    and entry.stat().st_mtime < cutoff
                ):
                    os.unlink(entry.path)
                    record = self._dir / f"{Path(entry.name).stem}.json"
                    with contextlib.suppress(FileNotFoundError):
                        record.unlink()
            except OSError:
                continue

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay or self._interval)
            self._wake.clear()
            if self._stopping:
                break
            try:
                # At once again while more is waiting (a burst larger than one request).
                while self.ship_once() and self._more_waiting() and not self._stopping:
                    pass
            except Exception:  # the thread must outlive any one bad file or answer
                log.exception("log shipping failed; trying again")
                self._delay = RETRY_MAX
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and self._more_waiting() and self.ship_once():
            pass

    def _more_waiting(self) -> bool:
        with self._lock:
            logs = list(self._logs.values())
        return any(e.ended or _size(e.path) > e.shipped for e in logs)

    def ship_once(self) -> bool:
        """Send one request's worth; True if it changed anything (sent, or split a refused
        batch), False when there was nothing to send or the server could not take it."""
        chunks = self._batch()
        self._observe()
        if not chunks:
            return False
        try:
            body = self._api.call("POST", ROUTE, {"chunks": [c.body() for c in chunks]})
        except ServerUnavailable as exc:
            self._delay = exc.not_before(min(RETRY_MAX, max(RETRY_MIN, self._delay * 2)))
            metrics.LOG_SHIP_REQUESTS.labels("failed").inc()
            if not self._unavailable:
                log.warning("log shipping paused, the server is unavailable: %s", exc)
            self._unavailable = str(exc)
            return False
        except ApiRefused as exc:
            metrics.LOG_SHIP_REQUESTS.labels("refused").inc()
            if exc.status in (404, 405):  # a server older than central logs
                log.warning("the server has no central logs (%s); trying again in a minute", exc)
                self._delay = 60.0
                return False
            self._refused(chunks, exc)
            return True
        metrics.LOG_SHIP_REQUESTS.labels("ok").inc()
        if self._unavailable:
            log.info("log shipping resumed")
            self._unavailable = ""
        self._delay = 0.0
        acks = body.get("acks", []) if isinstance(body, dict) else []
        # A chunk without an answer (a server that answered fewer) is simply sent again.
        answered = list(zip(chunks, acks, strict=False))
        self._applied([(c, int(a.get("end", c.offset))) for c, a in answered])
        return True

    def _batch(self) -> list[_Chunk]:
        with self._lock:
            logs = sorted(self._logs.values(), key=lambda e: e.pending_since or float("inf"))
            alone = [e for e in logs if e.alone]
            if alone:
                logs = alone[:1]
            snapshot = [(e, e.opened, e.shipped, e.ended) for e in logs]
        chunks: list[_Chunk] = []
        budget = REQUEST_BYTES
        for entry, opened, shipped, ended in snapshot:
            if len(chunks) >= CHUNKS_PER_REQUEST or budget <= 0:
                break
            chunk = self._read(entry, opened, shipped, ended, min(CHUNK_BYTES, budget))
            if chunk is not None:
                chunks.append(chunk)
                budget -= chunk.length
        return chunks

    def _read(
        self, entry: _Log, opened: int, shipped: int, ended: bool, most: int
    ) -> _Chunk | None:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            data, size = b"", shipped  # deleted under us: nothing more to send, say final
        else:
            try:
                size = os.fstat(fd).st_size
                data = os.pread(fd, min(most, max(0, size - shipped)), shipped)
            finally:
                os.close(fd)
        at_end = shipped + len(data) >= size
        text, length = _decoded(data, ended and at_end)
        final = ended and shipped + length >= size
        if length == 0 and not final:
            return None
        return _Chunk(entry, opened, shipped, length, text, final)

    def _applied(self, answers: list[tuple[_Chunk, int]]) -> None:
        """Record what the server now holds of each stream (its end: where the next chunk
        starts, lower than what was sent if the server lost some)."""
        with self._lock:
            for chunk, end in answers:
                entry = chunk.log
                metrics.LOG_SHIPPED_BYTES.inc(
                    max(0, min(end, chunk.offset + chunk.length) - chunk.offset)
                )
                entry.shipped = max(0, min(end, _size(entry.path)))
                entry.alone = False
                if (
                    chunk.final
                    and end >= chunk.offset + chunk.length
                    and entry.opened == chunk.opened
                ):
                    entry.done = True
                    self._logs.pop(entry.name, None)
                self._write_record(entry)

    def _refused(self, chunks: list[_Chunk], exc: ApiRefused) -> None:
        """A 4xx: a batch is split to find the chunk at fault; a chunk refused alone is
        given up (logged), so one bad log does not stop every other one."""
        with self._lock:
            if len(chunks) > 1:
                for chunk in chunks:
                    chunk.log.alone = True
                return
            entry = chunks[0].log
            log.error("the server refused the log of %s %s: %s", entry.kind, entry.item_id, exc)
            entry.done = True
            self._logs.pop(entry.name, None)
            self._write_record(entry)

    def _observe(self) -> None:
        """Set the lag and pending-bytes gauges from what the files hold now."""
        now = time.monotonic()
        pending = 0
        oldest = now
        with self._lock:
            for entry in self._logs.values():
                behind = max(0, _size(entry.path) - entry.shipped)
                if behind and entry.pending_since is None:
                    entry.pending_since = now
                elif not behind:
                    entry.pending_since = None
                pending += behind
                if entry.pending_since is not None:
                    oldest = min(oldest, entry.pending_since)
        metrics.LOG_PENDING_BYTES.set(pending)
        metrics.LOG_SHIP_LAG.set(now - oldest)

    # --- records ------------------------------------------------------------------------------

    def _read_record(self, path: Path) -> _Log | None:
        try:
            raw = json.loads(path.read_text())
            return _Log(
                kind=str(raw["kind"]),
                item_id=str(raw["item_id"]),
                path=str(raw["path"]),
                stream=str(raw["stream"]),
                shipped=int(raw["shipped"]),
                execution=int(raw.get("execution", 0)),
                done=bool(raw.get("done", False)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the unreadable log-shipping record %s: %s", path, exc)
            return None

    def _write_record(self, entry: _Log) -> None:
        """Rewrite the file's record in place (:func:`rewrite_in_place`): a supervisor killed
        at any point leaves the old end or the new one (an old end only means bytes sent
        again, which the server does not store twice).

        Not synced: a record is written twice per item, once on the launch path, and an
        ``fsync`` each was a fifth of the supervisor's time under load. A sync would only
        matter across a power cut or a kernel crash, which also takes the sandboxes, the log
        files' unsynced tails and the server's last SQLite commits (``synchronous =
        NORMAL``). A record lost that way costs at worst a tail sent again under a new
        stream, or a log that never says final, which readers settle as a lost supervisor's.
        """
        try:
            rewrite_in_place(self._dir / f"{entry.name}.json", json.dumps(entry.record()).encode())
        except (OSError, ValueError) as exc:  # a full disk must not stop shipping
            log.warning("cannot record the log-shipping state of %s: %s", entry.name, exc)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


__all__ = ["LogShipper", "mark_resumed"]
