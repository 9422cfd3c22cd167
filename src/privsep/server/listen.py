"""The API's two listening sockets: TCP for remote supervisors, a unix socket for local ones.

The unix socket is created mode 0660 inside a 0750 directory: uvicorn would leave it at the
umask's default (often 0666), which lets any local user reach the API without a network hop.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat


class ListenError(Exception):
    """A socket could not be opened; the message says which and why."""


def parse_bind(bind: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) to a tuple, with an error people can act on."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ListenError(f"server.bind {bind!r} is not host:port (for example 127.0.0.1:8780)")
    return host.strip("[]") or "127.0.0.1", int(port)


# The accept queue of each listening socket.
LISTEN_BACKLOG = 2048


def tcp_socket(bind: str, *, listen: bool = True) -> socket.socket:
    """Bound to ``bind`` (errors are reported here, at once); listening unless ``listen`` is
    false, in which case whoever serves calls ``listen(LISTEN_BACKLOG)`` when it is ready,
    and until then connection attempts are refused instead of waiting."""
    host, port = parse_bind(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit this: small JSON replies must not wait for Nagle + delayed ACK
    # (about 40 ms per request on a keep-alive connection without it).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"cannot listen on {bind}: {exc.strerror} "
            "(is another server running? change server.bind)"
        ) from None
    if listen:
        sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


def unix_socket(path: str, *, listen: bool = True) -> socket.socket:
    """Bind ``path`` at 0660 in a 0750 directory, replacing only a stale socket; listening
    unless ``listen`` is false (see :func:`tcp_socket`)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o750, exist_ok=True)
    os.chmod(directory, 0o750)  # noqa: S103 - group may connect; that is the point
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(
                f"{path} exists and is not a socket; move it away or change server.socket"
            )
        if _socket_is_live(path):
            raise ListenError(f"another server is already listening on {path}")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # the socket is born 0660: never briefly world-connectable
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o660)
    if listen:
        sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
