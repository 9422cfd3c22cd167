"""Bombs hit walls: pids, memory, fds, CPU, disk; the supervisor stays healthy."""

from __future__ import annotations

from hostile_kit import HOSTILE_LIMITS, Hostile, with_limits

from privsep.sandbox import ExitReason


def test_fork_bomb_hits_the_pids_limit(hostile: Hostile) -> None:
    out = hostile.run("fork_bomb")
    assert out.status.ok, out.log
    assert out.report["error"] == "EAGAIN"
    assert out.report["children"] < (HOSTILE_LIMITS.pids or 0)


def test_memory_bomb_is_contained(hostile_any: Hostile) -> None:
    out = hostile_any.run("memory_bomb")
    limit_mb = (HOSTILE_LIMITS.memory_bytes or 0) >> 20
    if out.status.reason is ExitReason.MEMORY_LIMIT:
        return  # the cgroup's OOM killer got it first: also contained
    assert out.status.ok, out.log
    assert out.report["error"] == "MemoryError"
    assert out.report["allocated_mb"] <= limit_mb


def test_memory_spread_over_processes_hits_the_sandbox_limit(hostile: Hostile) -> None:
    # Three children of 200 MiB each: every one is under the 256 MiB per-process rlimit.
    out = hostile.run("memory_bomb_forked", "3", "200")
    if "memory" in hostile.backend.cgroup_controllers:
        assert out.status.reason is ExitReason.MEMORY_LIMIT, (out.status, out.log)
        assert str(out.status).startswith("memory-limit: memory limit of 268435456 bytes")
    else:  # without a memory cgroup only the per-process rlimit holds
        assert out.status.ok


def test_fd_exhaustion_hits_nofile(hostile: Hostile) -> None:
    out = hostile.run("fd_exhaustion")
    assert out.report["error"] == "EMFILE"
    assert out.report["opened"] <= HOSTILE_LIMITS.nofile


def test_cpu_spin_hits_the_cpu_limit(hostile: Hostile) -> None:
    out = hostile.run("cpu_spin", limits=with_limits(cpu_seconds=1))
    assert out.status.reason is ExitReason.CPU_LIMIT, out.status
    assert out.status.cpu_seconds is not None and out.status.cpu_seconds >= 1
    assert str(out.status).startswith("cpu-limit: CPU limit of 1 s reached (SIGKILL)")


def test_cpu_spin_without_cpu_limit_hits_the_wall_clock(hostile: Hostile) -> None:
    out = hostile.run("cpu_spin", limits=with_limits(wall_seconds=1.0))
    assert out.status.reason is ExitReason.TIMEOUT


def test_disk_fill_hits_fsize_and_tmp_size(hostile: Hostile) -> None:
    out = hostile.run("disk_fill", ".")
    work = out.report["./fill"]
    assert work == {"written": HOSTILE_LIMITS.fsize_bytes, "error": "EFBIG"}
    tmp = out.report["/tmp/fill"]
    assert tmp["error"] == "ENOSPC" and tmp["written"] <= HOSTILE_LIMITS.tmp_bytes
    assert out.report["tmp_inodes"]["error"] == "ENOSPC"
