"""What a sandbox may ask its credential socket, and when: the protocol's state table.

Kept apart from the socket and connection code because it is the one part a reviewer must be
able to read whole: every request a child can make, per state of its socket, and what the
supervisor does with it (OpenSSH's monitor keeps its dispatch tables the same way). The
connection code looks a request up here and has no other idea of what is allowed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from privsep.client._wire import ProxyRequest, TokenRequest

NO_TOKEN: Final = "no_token"  # noqa: S105 - an error code, not a secret
"""``ErrorReply.code`` when there is no token to hand out (not issued yet, expired, ended)."""


class SandboxState(enum.Enum):
    """Where a sandbox's socket is in its life."""

    WAITING = "waiting"
    """No process bound or no token set yet: connections are parked, unchecked and unread."""
    RUNNING = "running"
    """Root process bound and token set: peers in its tree get the token and may proxy."""
    ENDED = "ended"
    """The work item is over (or the sandbox broke the protocol): its token is dropped;
    ``token`` is answered ``no_token``, ``proxy`` is out of turn."""


class Action(enum.Enum):
    """What the server does with a permitted request."""

    HAND_OUT = "hand_out"
    PROXY = "proxy"
    REFUSE_ENDED = "refuse_ended"


@dataclass(frozen=True)
class Rule:
    """One row of the state table: a permitted request and how it is answered."""

    action: Action


RequestType = type[TokenRequest] | type[ProxyRequest]

ALLOWED: Final[Mapping[SandboxState, Mapping[RequestType, Rule]]] = {
    # Nothing is read before there is a process to check peers against and a token to give:
    # connections wait unread (see the credsock module doc), so nothing can be out of turn here.
    SandboxState.WAITING: {},
    SandboxState.RUNNING: {
        TokenRequest: Rule(Action.HAND_OUT),
        ProxyRequest: Rule(Action.PROXY),
    },
    # A child still asking for its token at the end gets a plain refusal; one still calling
    # the API through us after its work item ended is out of turn.
    SandboxState.ENDED: {TokenRequest: Rule(Action.REFUSE_ENDED)},
}
"""Per state, the requests a sandbox may make. Anything else closes the connection and is
reported through ``on_violation``."""


@dataclass
class Counters:
    """What happened on one socket (or, summed, on all of them). Written by the loop thread."""

    accepted: int = 0
    over_capacity: int = 0
    peer_rejected: int = 0
    timeouts: int = 0
    violations: int = 0
    tokens_served: int = 0
    refusals: int = 0
    proxied: int = 0
    proxy_unavailable: int = 0


__all__ = ["ALLOWED", "NO_TOKEN", "Action", "Counters", "RequestType", "Rule", "SandboxState"]
