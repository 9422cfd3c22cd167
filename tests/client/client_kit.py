"""A real API server and a stand-in supervisor for the client SDK's tests.

``LiveServer`` runs the real FastAPI app on a real uvicorn, in a background thread, on a free
127.0.0.1 port *and* on a unix socket, against a real SQLite database (copied from a template
migrated once per session) and a real key ring. Nothing of the server is stubbed.

``StandInSupervisor`` answers the credential socket the way ``runner supervisor`` will: it
hands out a work token it obtained by really claiming work from that server, refreshes it
through ``/v1/supervisor/refresh``, and forwards ``proxy`` calls with ``requests``. It stands
in for the supervisor (issue 5, written separately) so the client can be tested end to end
now; it implements the protocol in ``privsep.client._wire``, not the supervisor's peer checks
or state table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from privsep.client import _wire
from privsep.client._exceptions import ConnectionLost, ProtocolError
from privsep.secrets.fernet import generate_fernet_key
from privsep.secrets.tokens import create_assertion
from privsep.server.app import create_app
from privsep.server.db import Database, sqlite_url_for
from privsep.server.db.models import ParseError, ParseJob, Supervisor, WorkflowVersion, XCom
from privsep.server.db.models import Workflow as WorkflowRow
from privsep.server.listen import tcp_socket, unix_socket
from privsep.server.settings import ServerSettings
from privsep.server.state import build_state

AUDIENCE = "http://privsep.test"
WORKFLOWS = Path(__file__).parent / "workflows"


def _pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Work:
    kind: str
    id: str
    token: str
    expires_at: int
    body: dict[str, Any]


class LiveServer:
    """The real app under uvicorn on TCP and a unix socket, plus helpers that act as the
    operator and the supervisor would (over real HTTP)."""

    def __init__(self, directory: Path, template_db: Path, ring: Path, **overrides: Any) -> None:
        db_file = directory / "privsep.db"
        shutil.copy(template_db, db_file)
        self.db = Database.from_url(sqlite_url_for(db_file))
        self.operator_key = Ed25519PrivateKey.generate()
        op_pub = directory / "operator.pub"
        op_pub.write_text(_pem(self.operator_key))
        settings = ServerSettings(
            database_url=str(self.db.engine.url),
            signing_keyring=str(ring),
            audience=AUDIENCE,
            fernet_keys=(generate_fernet_key(),),
            operator_public_key=str(op_pub),
            **overrides,
        )
        self.state = build_state(settings, self.db)
        self._sockdir = tempfile.mkdtemp(prefix="psc-", dir="/tmp")  # short: AF_UNIX limit
        self.socket_path = f"{self._sockdir}/api/api.sock"
        tcp = tcp_socket("127.0.0.1:0")
        # Without TCP_NODELAY every keep-alive request waits ~40 ms (Nagle + delayed ACK);
        # reported to the server's owner, since privsep.server.listen.tcp_socket has it too.
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = tcp.getsockname()[1]
        uds = unix_socket(self.socket_path)
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(self.state), log_level="warning", access_log=False, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=[tcp, uds])),
            name="uvicorn",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.http = requests.Session()
        self.http.trust_env = False
        self.supervisor_token = self._supervisor_session()
        self.operator_token = self._operator_session()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.http.close()
        self.db.dispose()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    @property
    def unix_url(self) -> str:
        return "http+unix://" + quote(self.socket_path, safe="")

    # --- raw calls -------------------------------------------------------------------------

    def call(self, method: str, path: str, token: str, body: Any = None) -> requests.Response:
        return self.http.request(
            method, self.url + path, json=body, headers=bearer(token), timeout=10
        )

    def ok(self, method: str, path: str, token: str, body: Any = None) -> Any:
        resp = self.call(method, path, token, body)
        assert resp.status_code == 200, f"{method} {path}: {resp.status_code} {resp.text}"
        return resp.json()

    # --- identities ------------------------------------------------------------------------

    def _supervisor_session(self) -> str:
        key = Ed25519PrivateKey.generate()
        name = f"sup-{uuid.uuid4().hex[:8]}"
        with self.state.db.write_session() as session:
            session.add(Supervisor(name=name, public_key_pem=_pem(key)))
        assertion = create_assertion(key, supervisor_name=name, audience=AUDIENCE)
        resp = self.http.post(self.url + "/v1/supervisor/session", json={"assertion": assertion})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["token"])

    def _operator_session(self) -> str:
        assertion = create_assertion(
            self.operator_key, supervisor_name="operator", audience=AUDIENCE
        )
        resp = self.http.post(self.url + "/v1/operator/session", json={"assertion": assertion})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["token"])

    # --- supervisor's side -----------------------------------------------------------------

    def claim(self, kind: str) -> Work:
        """Claim exactly one item of ``kind`` (the test knows one is queued)."""
        body = self.ok(
            "POST",
            "/v1/supervisor/claim",
            self.supervisor_token,
            {"kinds": [kind], "max_items": 1},
        )
        items = body["items"]
        assert len(items) == 1, f"expected one queued {kind} item, got {items}"
        item = items[0]
        return Work(kind, item["id"], item["token"], item["expires_at"], item)

    def queue_parse(self, path: Path) -> Work:
        self.ok("POST", "/v1/supervisor/parse-jobs", self.supervisor_token, {"uri": str(path)})
        return self.claim("parse")

    def refresh(self, work: Work) -> tuple[str, int]:
        body = self.ok(
            "POST",
            "/v1/supervisor/refresh",
            self.supervisor_token,
            {"kind": work.kind, "id": work.id},
        )
        return str(body["token"]), int(body["expires_at"])

    # --- operator's side -------------------------------------------------------------------

    def grant(self, workflow: str, kind: str, name: str) -> None:
        self.ok(
            "POST",
            "/v1/operator/policy",
            self.operator_token,
            {"workflow_pattern": workflow, "kind": kind, "name_pattern": name},
        )

    def put_variable(self, key: str, value: str) -> None:
        self.ok("PUT", f"/v1/operator/variables/{key}", self.operator_token, {"value": value})

    def put_connection(self, conn_id: str, **fields: Any) -> None:
        self.ok("PUT", f"/v1/operator/connections/{conn_id}", self.operator_token, fields)

    def trigger_run(self, workflow_id: str, conf: dict[str, Any] | None = None) -> str:
        body = self.ok(
            "POST",
            f"/v1/operator/workflows/{workflow_id}/runs",
            self.operator_token,
            {"conf": conf or {}},
        )
        return str(body["id"])

    def attempts(self, run_id: str) -> list[dict[str, Any]]:
        body = self.ok("GET", f"/v1/operator/runs/{run_id}/attempts", self.operator_token)
        return list(body["attempts"])

    def run_state(self, run_id: str) -> str:
        body = self.ok("GET", "/v1/operator/runs", self.operator_token)
        (run,) = [r for r in body["runs"] if r["id"] == run_id]
        return str(run["state"])

    # --- what the API stored (read from the database: there is no operator route) ---------

    def stored_definition(self, workflow_id: str) -> dict[str, Any]:
        with self.db.read_session() as session:
            workflow = session.get(WorkflowRow, workflow_id)
            assert workflow is not None, f"no workflow {workflow_id!r} was stored"
            version = session.get(WorkflowVersion, workflow.current_version_id)
            assert version is not None
            return dict(json.loads(version.definition))

    def parse_errors(self, uri: str) -> list[str]:
        with self.db.read_session() as session:
            rows = session.scalars(select(ParseError).where(ParseError.file_path == uri))
            return [row.message for row in rows]

    def parse_job_state(self, job_id: str) -> str:
        with self.db.read_session() as session:
            job = session.get(ParseJob, job_id)
            assert job is not None
            return str(job.state.value)

    def xcom(self, run_id: str, task_id: str, key: str = "return_value") -> Any:
        with self.db.read_session() as session:
            row = session.scalars(
                select(XCom).where(XCom.run_id == run_id, XCom.task_id == task_id, XCom.key == key)
            ).first()
            assert row is not None, f"no XCom {key!r} of {task_id!r}"
            return row.value

    def define(self, definition: dict[str, Any]) -> None:
        """Publish a workflow definition directly, as a parse sandbox would."""
        job = self.queue_parse(Path(f"/defs/{definition['workflow_id']}.py"))
        self.ok("POST", "/v1/parse/result", job.token, {"workflows": [definition]})


@dataclass
class StandInSupervisor:
    """The supervisor's half of the credential socket, for one work item. See the module
    docstring: real token, real forwarding, no peer checks."""

    server: LiveServer
    work: Work
    path: str
    refresh_fraction: float = 0.5
    token_requests: list[float] = field(default_factory=list)
    proxied: list[tuple[str, str]] = field(default_factory=list)
    closed_for: list[str] = field(default_factory=list)
    error_reply: _wire.ErrorReply | None = None
    handed_out: list[_wire.TokenReply] = field(default_factory=list)
    stale_first: list[_wire.TokenReply] = field(default_factory=list)
    """Token replies to hand out before the real one (e.g. an expired token)."""

    def __post_init__(self) -> None:
        self.token = self.work.token
        self.expires_at = self.work.expires_at
        self._issued_at = time.time()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(8)
        self._stopping = False
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True, name="stand-in")
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _current_token(self) -> _wire.TokenReply:
        lifetime = self.expires_at - self._issued_at
        if time.time() > self._issued_at + self.refresh_fraction * lifetime:
            self.token, self.expires_at = self.server.refresh(self.work)
            self._issued_at = time.time()
        return _wire.TokenReply(token=self.token, expires_at=self.expires_at)

    def _answer(self, request: _wire.ToSupervisor) -> _wire.ToSandbox:
        if self.error_reply is not None:
            return self.error_reply
        if isinstance(request, _wire.TokenRequest):
            self.token_requests.append(time.time())
            reply = self.stale_first.pop(0) if self.stale_first else self._current_token()
            self.handed_out.append(reply)
            return reply
        self.proxied.append((request.method, request.path))
        resp = self.server.http.request(
            request.method,
            self.server.url + request.path,
            json=request.body,
            headers=bearer(self.token),
            timeout=10,
        )
        return _wire.ProxyResponse(
            status=resp.status_code, body=resp.json() if resp.content else None
        )

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    request = _wire.parse_request(_wire.recv_frame(conn))
                    _wire.send_message(conn, self._answer(request))
                except ConnectionLost:
                    return
                except ProtocolError as exc:  # as the supervisor will: drop, never answer
                    self.closed_for.append(str(exc))
                    return

    def stop(self) -> None:
        self._stopping = True
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            Path(self.path).unlink()
