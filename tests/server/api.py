"""A real server for tests: real database, real key ring, real auth, the app in-process.

``ApiHarness`` drives the app through httpx's ASGI transport (FastAPI's ``TestClient``), so
every request goes through routing, the body cap, the auth dependencies and the database
exactly as it does under uvicorn. Nothing is stubbed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from privsep.secrets.fernet import generate_fernet_key
from privsep.secrets.files import make_private_dir
from privsep.secrets.keyring import create_keyring
from privsep.secrets.tokens import create_assertion
from privsep.server.app import create_app
from privsep.server.db import Database
from privsep.server.db.models import Supervisor
from privsep.server.settings import ServerSettings
from privsep.server.state import ServerState, build_state

AUDIENCE = "http://privsep.test"


def public_pem(key: Ed25519PrivateKey) -> str:
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
    body: dict[str, Any]


class ApiHarness:
    def __init__(self, db: Database, tmp: Path, **overrides: Any) -> None:
        ring = tmp / "ring"
        make_private_dir(str(ring))
        create_keyring(str(ring))
        self.operator_key = Ed25519PrivateKey.generate()
        op_pub = tmp / "operator.pub"
        op_pub.write_text(public_pem(self.operator_key))
        settings = ServerSettings(
            database_url=str(db.engine.url),
            signing_keyring=str(ring),
            audience=AUDIENCE,
            fernet_keys=(generate_fernet_key(),),
            operator_public_key=str(op_pub),
            **overrides,
        )
        self.state: ServerState = build_state(settings, db)
        self.app = create_app(self.state)
        self.client = TestClient(self.app, raise_server_exceptions=True)
        self.supervisors: dict[str, Ed25519PrivateKey] = {}

    # --- identities -------------------------------------------------------------------------

    def register_supervisor(self, name: str) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        with self.state.db.write_session() as session:
            session.add(Supervisor(name=name, public_key_pem=public_pem(key)))
        self.supervisors[name] = key
        return key

    def supervisor_session(self, name: str) -> str:
        assertion = create_assertion(
            self.supervisors[name], supervisor_name=name, audience=AUDIENCE
        )
        resp = self.client.post("/v1/supervisor/session", json={"assertion": assertion})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["token"])

    def operator_session(self) -> str:
        assertion = create_assertion(
            self.operator_key, supervisor_name="operator", audience=AUDIENCE
        )
        resp = self.client.post("/v1/operator/session", json={"assertion": assertion})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["token"])

    # --- work -------------------------------------------------------------------------------

    def claim(self, session_token: str, kinds: list[str], max_items: int = 10) -> list[Work]:
        resp = self.client.post(
            "/v1/supervisor/claim",
            json={"kinds": kinds, "max_items": max_items},
            headers=bearer(session_token),
        )
        assert resp.status_code == 200, resp.text
        return [
            Work(item["kind"], item["id"], item["token"], item) for item in resp.json()["items"]
        ]

    def define_workflow(self, session_token: str, definition: dict[str, Any]) -> None:
        """Publish a workflow the way discovery does: a parse job, claimed and answered."""
        uri = f"file:///workflows/{definition['workflow_id']}-{uuid.uuid4().hex[:6]}.py"
        resp = self.client.post(
            "/v1/supervisor/parse-jobs", json={"uri": uri}, headers=bearer(session_token)
        )
        assert resp.status_code == 200, resp.text
        (job,) = self.claim(session_token, ["parse"], 1)
        resp = self.client.post(
            "/v1/parse/result", json={"workflows": [definition]}, headers=bearer(job.token)
        )
        assert resp.status_code == 200, resp.text

    def trigger_run(self, operator_token: str, workflow_id: str, conf: Any = None) -> str:
        resp = self.client.post(
            f"/v1/operator/workflows/{workflow_id}/runs",
            json={"conf": conf or {}},
            headers=bearer(operator_token),
        )
        assert resp.status_code == 200, resp.text
        return str(resp.json()["id"])


def task(task_id: str, *upstream: str, **options: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "upstream": list(upstream),
        "module": "workflows.example",
        "qualname": task_id,
        **options,
    }


def workflow(workflow_id: str, *tasks: dict[str, Any]) -> dict[str, Any]:
    return {"workflow_id": workflow_id, "schedule": None, "tasks": list(tasks)}


def error_code(resp: Any) -> str:
    body = json.loads(resp.text)
    assert set(body) == {"code", "message"}, body
    return str(body["code"])
