"""Every error the client SDK raises, under one root.

Workflow code can catch :class:`PrivsepError` for "anything privsep", or one branch of the tree
to react to one cause. The tree::

    PrivsepError
    ├── NotInSandbox          PRIVSEP_CREDENTIAL_SOCKET is not set: not running in a sandbox
    ├── DefinitionError       a definition file describes an invalid workflow (cycle, ...)
    ├── ClientClosed          the Client was closed; it cannot be reopened
    ├── APIError              the API answered with an error (.status, .code, .message)
    │   ├── BadRequest        400, 413, 422: the request itself is wrong
    │   ├── Unauthorized      401: the token was refused ("expired", "revoked", ...)
    │   ├── NotPermitted      403: e.g. policy grants this workflow no such variable
    │   ├── NotFound          404: no such variable, connection or XCom
    │   └── Conflict          409: the work item no longer allows this (e.g. it has ended)
    ├── ServerUnavailable     5xx, a timeout, or the API could not be reached
    ├── Refused               the supervisor answered the credential socket with an error
    ├── ProtocolError         a malformed frame, or a message that was not expected
    │   └── FrameTooLarge     a frame longer than MAX_FRAME (refused before reading it)
    └── ConnectionLost        the credential socket closed mid-conversation (EOF, short read)

Messages say what was attempted and on what, then why; they never contain a token.
"""

from __future__ import annotations


class PrivsepError(Exception):
    """Root of every error raised by :mod:`privsep.client`."""


class NotInSandbox(PrivsepError):
    """The process was not started by a privsep supervisor (no credential socket)."""


class DefinitionError(PrivsepError):
    """A workflow definition cannot be serialized: a duplicate workflow id, an unknown
    upstream task, a dependency cycle. Raised while parsing; stored as the file's parse
    error."""


class ClientClosed(PrivsepError):
    """A closed :class:`~privsep.client.Client` was used again."""


class APIError(PrivsepError):
    """The API refused a call. ``code`` is stable and meant for programs; ``message`` is for
    people. ``status`` is the HTTP status."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status}, code {self.code!r})"


class BadRequest(APIError):
    """400, 413 or 422: the request does not match what the API accepts."""


class Unauthorized(APIError):
    """401: the token was refused. ``code`` is ``"expired"`` or ``"revoked"`` (the attempt this
    token was issued for has ended), or another reason from the server."""


class NotPermitted(APIError):
    """403: the token's subject may not do this; ``code == "not_granted"`` when operator policy
    grants the workflow no access to the variable or connection."""


class NotFound(APIError):
    """404: no such variable, connection or XCom."""


class Conflict(APIError):
    """409: the resource is in a state that does not allow the call."""


class ServerUnavailable(PrivsepError):
    """The API could not answer: a 5xx, a timeout, or no connection.

    ``status`` is the HTTP status when there was one. ``request_sent`` is False only when the
    request certainly never left this process (the connection could not even be opened); that
    is the one case in which a non-idempotent call may be retried safely.
    """

    def __init__(
        self, message: str, *, status: int | None = None, request_sent: bool = True
    ) -> None:
        super().__init__(message)
        self.status = status
        self.request_sent = request_sent


class Refused(PrivsepError):
    """The supervisor answered with an ``error`` message instead of doing what was asked."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"{super().__str__()} (code {self.code!r})"


class ProtocolError(PrivsepError):
    """A frame on the credential socket is malformed, or is not the reply that was expected."""


class FrameTooLarge(ProtocolError):
    """A frame announced more than ``MAX_FRAME`` bytes; nothing of it was read."""


class ConnectionLost(PrivsepError):
    """The credential socket closed, or was reset, in the middle of a conversation."""
