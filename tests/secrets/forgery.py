"""Tokens forged by hand, as an attacker would send them: base64url segments signed with
``cryptography`` or ``hmac`` directly, so a test shows exactly which bytes go over the wire."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())


def forge_eddsa(header: dict[str, Any], payload: dict[str, Any], key: Ed25519PrivateKey) -> str:
    signing_input = segments(header, payload)
    return signing_input + "." + b64(key.sign(signing_input.encode()))


def forge_hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    signing_input = segments(header, payload)
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)
