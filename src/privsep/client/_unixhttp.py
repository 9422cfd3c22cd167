"""HTTP/1.1 over a unix socket, with the standard library only.

Shared by the SDK's direct transport (``_http``, through a ``requests`` adapter) and the
supervisor's keep-alive client (``privsep.runner.api.keepalive``): both reach a server on the same
host through its socket, which costs both sides less than loopback TCP. It lives in the client
package because the client may import nothing trusted, while the runner may import the client.
"""

from __future__ import annotations

import http.client
import socket

__all__ = ["UnixHTTPConnection"]


class UnixHTTPConnection(http.client.HTTPConnection):
    """An ``http.client`` connection to the unix socket at ``path``.

    ``host`` and ``port`` only name the server in the ``Host`` header; nothing resolves them.
    """

    def __init__(
        self,
        path: str,
        host: str = "localhost",
        port: int | None = None,
        *,
        timeout: float | None,
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
