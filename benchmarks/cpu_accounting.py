"""CPU accounting for the end-to-end figures: the system's own CPU and the whole machine's.

Two readings, because they answer two questions:

- :class:`CpuMeter`: what the system under test was charged (its own ``cpuacct`` group, so
  every descendant counts, however short-lived).
- :class:`MachineMeter`: what the whole machine spent, kernel threads included (network
  namespace teardown, cgroup release, RCU callbacks). It reads the root ``cpuacct`` group's
  ``cpuacct.usage``: the scheduler's own nanosecond count of every task on the machine, with
  no steal in it. ``/proc/stat`` is read beside it only as a cross-check: its fields are
  sampled at each tick and add the time other guests stole, so on a busy virtual machine it
  can both miss and inflate. What the machine spends while the system idles (the host's own
  daemons, such as ``kdamond``, which uses 5 % of a core here) is measured before the runs
  and subtracted, and the kernel threads' share is read per thread from ``schedstat``.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import Counter
from pathlib import Path

import psutil

CGROUP_V1_CPUACCT = Path("/sys/fs/cgroup/cpuacct")


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and every live descendant; empty once it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class CpuMeter:
    """CPU seconds used by the standalone process and everything under it.

    With cgroup v1, a ``cpuacct`` group of our own: the standalone process is moved into it
    before it execs, and every descendant (sandboxes included, however short-lived) is counted.
    The sandbox's own cgroups live in the memory, pids and freezer hierarchies, so this one does
    not disturb them. Otherwise psutil over the live tree, including the CPU of reaped children
    (which misses processes whose parent did not wait for them)."""

    ROOT = CGROUP_V1_CPUACCT

    def __init__(self) -> None:
        self.group: Path | None = None
        self.pid: int | None = None
        candidate = self.ROOT / f"privsep-bench-e2e-{os.getpid()}-{time.monotonic_ns()}"
        with contextlib.suppress(OSError):
            if (self.ROOT / "cpuacct.usage").exists():
                candidate.mkdir()
                self.group = candidate
        self.method = "cgroup v1 cpuacct" if self.group else "psutil process tree"

    def wrap(self, argv: list[str]) -> list[str]:
        if self.group is None:
            return argv
        procs = str(self.group / "cgroup.procs")
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *argv]

    def seconds(self) -> float:
        if self.group is not None:
            return int((self.group / "cpuacct.usage").read_text()) / 1e9
        assert self.pid is not None
        total = 0.0
        for proc in process_tree(self.pid):
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    def kernel_seconds(self) -> float | None:
        """System (kernel) CPU seconds so far, where the cgroup tells them apart."""
        if self.group is None:
            return None
        fields = dict(
            line.split() for line in (self.group / "cpuacct.stat").read_text().splitlines()
        )
        return int(fields["system"]) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.group is None:
            return
        for _ in range(50):  # the group empties as the last processes are reaped
            try:
                self.group.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def proc_stat_busy_seconds() -> float:
    """CPU seconds the whole machine was busy by ``/proc/stat`` (tick-sampled, steal included):
    the cross-check of :meth:`MachineMeter.seconds`."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def kernel_thread_seconds() -> dict[int, tuple[str, float]]:
    """Each live kernel thread (a child of kthreadd): its name with the numbers folded
    (``kworker/u4:2-netns`` → ``kworker/u*:*-netns``) and its CPU seconds so far. Exact
    (``schedstat``), but a worker that exits between two readings takes its time with it. Keyed
    by pid, because a kworker's name changes with the work it picks up."""
    out: dict[int, tuple[str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if entry.name != "2" and ppid != 2:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            ns = int(Path(f"/proc/{entry.name}/schedstat").read_text().split()[0])
            out[int(entry.name)] = (re.sub(r"\d+", "*", comm), ns / 1e9)
    return out


def kernel_threads_used(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> Counter[str]:
    """CPU seconds each kernel thread used between two readings, summed by its later name; a
    thread new since ``before`` counts from zero."""
    used: Counter[str] = Counter()
    for pid, (name, seconds) in after.items():
        used[name] += max(0.0, seconds - before.get(pid, (name, 0.0))[1])
    return used


class MachineMeter:
    """The whole machine's CPU seconds, from the root ``cpuacct`` group where there is one
    (exact, no steal), else ``/proc/stat`` without its steal field (see the module's doc)."""

    def __init__(self) -> None:
        usage = CGROUP_V1_CPUACCT / "cpuacct.usage"
        self.usage: Path | None = usage if usage.exists() else None
        self.method = (
            "the root cpuacct group (scheduler ns, no steal)"
            if self.usage
            else "/proc/stat without steal (tick-sampled)"
        )

    def seconds(self) -> float:
        if self.usage is not None:
            return int(self.usage.read_text()) / 1e9
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


__all__ = [
    "CpuMeter",
    "MachineMeter",
    "kernel_thread_seconds",
    "kernel_threads_used",
    "proc_stat_busy_seconds",
    "process_tree",
]
