"""Network namespaces as test "nodes": each has a veth pair to the host namespace.

A node's processes run with ``ip netns exec``; they reach services on the host through the
host end's address. Taking the host end down cuts the node off (packets are dropped, nothing is
refused), which is what a partition looks like from both sides.

Names carry the test process's pid and a random tag, so concurrent runs never collide, and a
later run deletes the namespaces of a run that died (its pid is gone) before it made its own.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import subprocess
from collections.abc import Sequence

PREFIX = "privsep-fault-"
_OWNED = re.compile(rf"^{PREFIX}(\d+)-")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale() -> None:
    """Delete the namespaces (and with them their veth pairs) of test runs that died."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        found = _OWNED.match(name)
        if found and not _alive(int(found[1])):
            _ip("netns", "del", name, check=False)


def _free_subnet() -> int:
    """A third octet for 10.213.N.0/24 that no address on this host uses."""
    used = _ip("-4", "-o", "addr").stdout
    for _ in range(100):
        octet = random.randint(1, 254)
        if f"10.213.{octet}." not in used:
            return octet
    raise RuntimeError("no free 10.213.N.0/24 subnet for a test node")


class Node:
    """One namespace and its link; :meth:`create`, then :meth:`destroy` (idempotent)."""

    def __init__(self, label: str) -> None:
        tag = secrets.token_hex(3)
        self.name = f"{PREFIX}{os.getpid()}-{tag}-{label}"
        # Interface names hold at most 15 bytes.
        self.host_if = f"pf{tag}{label[:1]}h"
        self.ns_if = f"pf{tag}{label[:1]}n"
        self.host_ip = ""
        self.ns_ip = ""
        self.created = False

    def create(self) -> None:
        octet = _free_subnet()
        self.host_ip, self.ns_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
        _ip("netns", "add", self.name)
        self.created = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if)
        _ip("-n", self.name, "link", "set", self.ns_if, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this node's namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def partition(self) -> None:
        """Cut the node off: its link goes down on the host's side."""
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def destroy(self) -> None:
        """Remove the link and the namespace; safe to call twice or after a failed create."""
        _ip("link", "del", self.host_if, check=False)
        if self.created:
            _ip("netns", "del", self.name, check=False)
            self.created = False
