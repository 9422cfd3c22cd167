"""A TCP proxy that loses one claim answer, for real, on a real socket.

It sits between one supervisor and the load balancer and forwards HTTP/1.1 requests and
responses one at a time. Once armed, it forwards the next ``POST /v1/supervisor/claim`` whose
answer hands out a task, then closes the supervisor's connection instead of passing that answer
on: the server has committed the claim, the supervisor never hears of it. This is the one fault
here that needs a program in the middle; the claim and its commit are still real.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from typing import Any

CLAIM = b"POST /v1/supervisor/claim "


def _read_message(sock: socket.socket, pending: bytearray) -> bytes | None:
    """One HTTP message with a Content-Length body (or none); ``None`` at end of stream."""
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        pending += chunk
    head_end = pending.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(pending[:head_end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        elif name.strip().lower() == b"transfer-encoding":
            raise ValueError("the proxy only handles Content-Length bodies")
    while len(pending) < head_end + length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        pending += chunk
    message = bytes(pending[: head_end + length])
    del pending[: head_end + length]
    return message


class ClaimDropper:
    """Listens on ``listen`` and forwards to ``upstream``; see the module docstring."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.server = socket.create_server(listen)
        self.armed = threading.Event()
        self.dropped: list[dict[str, Any]] = []  # the items of the lost answer
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(client)
            try:
                upstream = stack.enter_context(socket.create_connection(self.upstream, 10))
            except OSError:
                return
            upstream.settimeout(120)
            from_client, from_upstream = bytearray(), bytearray()
            try:
                while True:
                    request = _read_message(client, from_client)
                    if request is None:
                        return
                    upstream.sendall(request)
                    response = _read_message(upstream, from_upstream)
                    if response is None:
                        return
                    if request.startswith(CLAIM) and self._drop(response):
                        return  # the answer is lost and the connection closes
                    client.sendall(response)
            except (OSError, ValueError):
                return

    def _drop(self, response: bytes) -> bool:
        if not self.armed.is_set():
            return False
        try:
            items = json.loads(response.split(b"\r\n\r\n", 1)[1])["items"]
        except (ValueError, KeyError, IndexError):
            return False
        with self._lock:
            if not self.armed.is_set() or not any(i.get("kind") == "task" for i in items):
                return False
            self.armed.clear()
            self.dropped.extend(items)
            return True

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self._thread.join(timeout=5)
