"""Per-sandbox cgroups: a memory and a pids limit for the whole sandbox, and kill-as-a-unit.

rlimits are per process; a cgroup bounds the sandbox as a whole (a fork bomb or a memory bomb
spread over many processes) and lets the supervisor kill everything in it at once, including
processes that left the process group. Used wherever the hierarchies are writable; otherwise
the sandbox still has its rlimits and its PID namespace (whose teardown kills everything).

Both layouts are handled:

* cgroup v2: one directory; ``memory``/``pids`` when the controllers can be enabled for our
  subtree, and ``cgroup.kill`` (Linux 5.14+) either way;
* cgroup v1 (or hybrid): a directory in each of the ``memory``, ``pids`` and ``freezer``
  hierarchies; killing freezes first so nothing can fork or exit while it is signalled.

Sandbox cgroups are created *below the supervisor's own cgroup* in each hierarchy (a
``privsep-sandboxes`` directory), so they stay inside whatever limits the supervisor itself
runs under (a systemd slice, a container).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass, field

BASE_NAME = "privsep-sandboxes"


@dataclass(frozen=True)
class _Hierarchy:
    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: what the mount carries; v2: what we can enable
    base: str  # our directory of sandbox cgroups


def _read(path: str) -> str:
    with open(path, encoding="ascii") as fh:
        return fh.read()


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _own_cgroups() -> dict[str, str]:
    """Map of hierarchy key (``"memory,..."`` for v1, ``""`` for v2) to our path in it."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup", encoding="ascii") as fh:
        for line in fh:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            out[controllers] = path
    return out


def _cgroup_mounts() -> list[tuple[str, str, str, str]]:
    """(mount point, root inside the hierarchy, fstype, super options) of cgroup mounts."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) >= 3 and rfields[0] in ("cgroup", "cgroup2"):
                out.append((fields[4], fields[3], rfields[0], rfields[2]))
    return out


def _discover() -> list[_Hierarchy]:
    own = _own_cgroups()
    found: list[_Hierarchy] = []
    seen: set[str] = set()
    for point, root, fstype, options in _cgroup_mounts():
        if fstype == "cgroup2":
            key, wanted = "", {"memory", "pids"}
        else:
            opts = set(options.split(","))
            wanted = opts & {"memory", "pids", "freezer"}
            if not wanted:
                continue
            key = next((k for k in own if k and wanted <= set(k.split(","))), "")
            if not key:
                continue
        if key in seen or key not in own:
            continue
        rel = own[key]
        if root != "/" and (rel == root or rel.startswith(root + "/")):
            rel = rel[len(root) :] or "/"
        base = os.path.join(point, rel.lstrip("/"), BASE_NAME)
        try:
            os.makedirs(base, exist_ok=True)
        except OSError:
            continue
        if not os.access(base, os.W_OK):
            continue
        if fstype == "cgroup2":
            wanted = _enable_v2_controllers(os.path.dirname(base), base, wanted)
        seen.add(key)
        found.append(_Hierarchy(2 if fstype == "cgroup2" else 1, frozenset(wanted), base))
    return found


def _enable_v2_controllers(parent: str, base: str, wanted: set[str]) -> set[str]:
    """Enable what we can of ``wanted`` for children of ``base``; returns what worked."""
    try:
        available = set(_read(os.path.join(parent, "cgroup.controllers")).split())
    except OSError:
        return set()
    enabled = set()
    for name in sorted(wanted & available):
        try:
            _write(os.path.join(parent, "cgroup.subtree_control"), f"+{name}")
            _write(os.path.join(base, "cgroup.subtree_control"), f"+{name}")
        except OSError:
            continue
        enabled.add(name)
    return enabled


class CgroupManager:
    """Discovers the writable hierarchies once; creates one :class:`SandboxCgroup` per child."""

    def __init__(self) -> None:
        try:
            self._hierarchies = _discover()
        except OSError:
            self._hierarchies = []
        # With cgroup.kill (v2) the v1 freezer adds nothing but one more migration per launch.
        self._v2_kill = any(
            h.version == 2 and os.path.exists(os.path.join(h.base, "cgroup.kill"))
            for h in self._hierarchies
        )
        if self._v2_kill:
            self._hierarchies = [h for h in self._hierarchies if h.controllers != {"freezer"}]

    @property
    def controllers(self) -> frozenset[str]:
        """Controllers in force for sandboxes (``memory``, ``pids``, ``freezer``, ``kill``)."""
        out: set[str] = set()
        for h in self._hierarchies:
            out |= h.controllers
            if h.version == 2:
                out.add("kill")
        return frozenset(out)

    @property
    def available(self) -> bool:
        """Whether any hierarchy is usable."""
        return bool(self._hierarchies)

    def describe(self) -> str:
        """One line for logs: what per-sandbox control is in force."""
        if not self._hierarchies:
            return "no writable cgroup hierarchy: per-process rlimits and PID namespace only"
        parts = [
            f"v{h.version}[{','.join(sorted(h.controllers)) or 'kill'}] {h.base}"
            for h in self._hierarchies
        ]
        return "; ".join(parts)

    def create(
        self, name: str, *, memory_bytes: int | None = None, pids: int | None = None
    ) -> SandboxCgroup:
        """Make the sandbox's cgroups (and set limits, if given); raises ``OSError``."""
        group = SandboxCgroup()
        try:
            for h in self._hierarchies:
                path = os.path.join(h.base, name)
                os.mkdir(path, 0o755)
                group.dirs.append(path)
                group.procs.append(os.path.join(path, "cgroup.procs"))
                group.hierarchies.append((h.version, h.controllers, path))
                if h.version == 2 and os.path.exists(os.path.join(path, "cgroup.kill")):
                    group.kill_file = os.path.join(path, "cgroup.kill")
                if h.version == 1 and "freezer" in h.controllers:
                    group.freezer = path
            group.set_limits(memory_bytes=memory_bytes, pids=pids)
        except OSError:
            group.remove()
            raise
        return group


def _write_if_exists(path: str, text: str) -> None:
    try:
        _write(path, text)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EACCES):
            raise


@dataclass
class SandboxCgroup:
    """The directories of one sandbox's cgroups."""

    dirs: list[str] = field(default_factory=list)
    procs: list[str] = field(default_factory=list)
    oom_files: list[str] = field(default_factory=list)
    hierarchies: list[tuple[int, frozenset[str], str]] = field(default_factory=list)
    kill_file: str | None = None
    freezer: str | None = None

    def set_limits(self, *, memory_bytes: int | None, pids: int | None) -> None:
        """Write the memory and pids limits (before user code runs; may follow the join)."""
        for version, controllers, path in self.hierarchies:
            if "memory" in controllers and memory_bytes:
                if version == 2:
                    _write(os.path.join(path, "memory.max"), str(memory_bytes))
                    _write_if_exists(os.path.join(path, "memory.swap.max"), "0")
                    self.oom_files.append(os.path.join(path, "memory.events"))
                else:
                    _write(os.path.join(path, "memory.limit_in_bytes"), str(memory_bytes))
                    memsw = os.path.join(path, "memory.memsw.limit_in_bytes")
                    _write_if_exists(memsw, str(memory_bytes))
                    self.oom_files.append(os.path.join(path, "memory.oom_control"))
            if "pids" in controllers and pids:
                _write(os.path.join(path, "pids.max"), str(pids))

    def pids(self) -> set[int]:
        """Live pids in the sandbox's cgroups (host namespace)."""
        out: set[int] = set()
        for path in self.procs:
            try:
                out.update(int(x) for x in _read(path).split())
            except OSError:
                continue
        return out

    def kill(self) -> None:
        """SIGKILL every process in the sandbox, as one unit where the kernel allows."""
        if self.kill_file is not None:
            try:
                _write(self.kill_file, "1")
                return
            except OSError:
                pass
        if self.freezer is not None:
            self._kill_frozen(self.freezer)
            return
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue

    def _kill_frozen(self, path: str) -> None:
        state = os.path.join(path, "freezer.state")
        try:
            _write(state, "FROZEN")
            # A frozen task can neither fork nor exit, so its pid cannot be reused under us.
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
        finally:
            with contextlib.suppress(OSError):
                _write(state, "THAWED")

    def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed a process because of this sandbox's memory limit."""
        for path in self.oom_files:
            try:
                for line in _read(path).splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value or 0) > 0:
                        return True
            except (OSError, ValueError):
                continue
        return False

    def remove(self, attempts: int = 1, delay: float = 0.0) -> bool:
        """rmdir every directory; True when all are gone. Empty cgroups only."""
        for attempt in range(attempts):
            left = []
            for path in self.dirs:
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    continue
                except OSError:
                    left.append(path)
            self.dirs = left
            if not left:
                return True
            if attempt + 1 < attempts:
                time.sleep(delay)
        return False
