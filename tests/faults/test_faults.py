"""Faults on real processes: every task succeeds once, no user code runs twice unless its
sandbox really died, every run closes, nothing is left over, and work resumes within the
heartbeat timeout.

The cluster (see :mod:`faults.cluster`) is PostgreSQL, two server replicas behind haproxy and
two supervisors, each in its own network namespace. Each scenario triggers a few runs of small
and sleeping tasks (``retries=2``), injects one fault while they run, restores, and checks the
invariants. Waits are for states, each with a bound; the bounds that matter are the recovery
ones, which the heartbeat timeout sets.
"""

from __future__ import annotations

import signal

import pytest

from faults.cluster import HEARTBEAT_TIMEOUT, Cluster, settle

RUNS = 2
# The reaper looks every heartbeat_timeout / 4: a lost node's work is taken back at most that
# long after the timeout passed.
REAPED_WITHIN = HEARTBEAT_TIMEOUT * 1.25 + 5
GRACE = HEARTBEAT_TIMEOUT / 4  # how old an unheld claim must be before it is taken back
STARTUP_S = 10  # a restarted supervisor's start-up (imports, session) on a loaded 2-core host


def _sleepers_running_on(cluster: Cluster, node: str, runs: list[str]) -> list[dict[str, object]]:
    return [a for a in cluster.running_on(node, runs) if str(a["task_id"]).startswith("s")]


pytestmark = pytest.mark.slow


def test_supervisor_killed_and_restarted(cluster: Cluster) -> None:
    runs = cluster.trigger(RUNS)
    cluster.wait(lambda: _sleepers_running_on(cluster, "a", runs), 120, "a sleeper on node a")
    doomed = {p.pid for p in cluster.tree("supervisor-a")}
    assert cluster.kill("supervisor-a") == -signal.SIGKILL
    # Node a is dead, so what the server thinks it runs is frozen: these sandboxes died with
    # it (or are killed when it restarts) and may run again.
    held = cluster.running_on("a", runs)
    assert held
    cluster.start_supervisor("a")
    # The restarted supervisor holds nothing; the server takes the attempts back once their
    # claims are older than the grace period, well within the heartbeat timeout.
    cluster.wait(
        lambda: not {a["id"] for a in held} & {a["id"] for a in cluster.running_on("a", runs)},
        HEARTBEAT_TIMEOUT + STARTUP_S,
        "the killed node's attempts to be taken back",
    )
    cluster.wait(
        lambda: not any(_alive(pid) for pid in doomed),
        30,
        "the killed supervisor's sandboxes and zygote to be gone",
    )
    cluster.wait_closed(runs)
    cluster.assert_invariants(runs, may_rerun=held)


def test_replica_killed_and_restarted(cluster: Cluster) -> None:
    runs = cluster.trigger(RUNS)
    cluster.wait(
        lambda: len(cluster.running_on("a", runs) + cluster.running_on("b", runs)) >= 3,
        120,
        "work running on the nodes",
    )
    before = cluster.successes(runs)
    assert cluster.kill("replica-a") == -signal.SIGKILL
    cluster.await_progress(runs, before, HEARTBEAT_TIMEOUT, "work to go on with one replica")
    cluster.start_replica("a")
    cluster.wait_closed(runs)
    cluster.assert_invariants(runs, may_rerun=[])


def test_postgres_crashed_and_restarted(cluster: Cluster) -> None:
    runs = cluster.trigger(RUNS)
    cluster.wait(
        lambda: (
            len(_sleepers_running_on(cluster, "a", runs))
            + len(_sleepers_running_on(cluster, "b", runs))
            >= 2
        ),
        120,
        "sleepers running on the nodes",
    )
    before = cluster.successes(runs)
    cluster.postgres.crash()
    try:
        # Shorter than the heartbeat timeout: no supervisor is lost, but reports, claims and
        # heartbeats all meet the outage.
        settle(3)
    finally:
        cluster.postgres.restart()
    cluster.await_progress(runs, before, HEARTBEAT_TIMEOUT, "work to go on after the restart")
    cluster.wait_closed(runs)
    cluster.assert_invariants(runs, may_rerun=[])


def test_node_partitioned_longer_than_the_heartbeat_timeout(cluster: Cluster) -> None:
    runs = cluster.trigger(RUNS)
    cluster.wait(lambda: _sleepers_running_on(cluster, "a", runs), 120, "a sleeper on node a")
    node = cluster.nodes["a"]
    node.partition()
    try:
        # Cut off, node a can no longer claim or report: the set is frozen. Its sandboxes go
        # on running, so their code may run a second time elsewhere.
        held = cluster.running_on("a", runs)
        assert held
        ids = {a["id"] for a in held}
        cluster.wait(
            lambda: not ids & {a["id"] for a in cluster.running_on("a", runs)},
            REAPED_WITHIN,
            "the partitioned node's attempts to be taken back",
        )
        retried = {(a["run_id"], a["task_id"]) for a in held}
        cluster.wait(
            lambda: any(
                (a["run_id"], a["task_id"]) in retried and a["try_number"] > 1
                for a in cluster.attempts(runs)
                if a["supervisor_id"] == cluster.supervisor_ids["b"]
            ),
            HEARTBEAT_TIMEOUT,
            "node b to take over the partitioned node's work",
        )
    finally:
        node.heal()
    cluster.wait_closed(runs)
    cluster.wait(lambda: cluster.supervisor_alive("a"), HEARTBEAT_TIMEOUT, "node a to be back")
    cluster.assert_invariants(runs, may_rerun=held)


def test_lost_claim_answer_is_handed_back_within_the_grace_period(cluster: Cluster) -> None:
    assert cluster.proxy is not None
    cluster.proxy.armed.set()
    try:
        runs = cluster.trigger(RUNS)
        cluster.wait(lambda: cluster.proxy and cluster.proxy.dropped, 120, "a claim answer lost")
    finally:
        cluster.proxy.armed.clear()
    lost = {str(i["id"]) for i in cluster.proxy.dropped if i["kind"] == "task"}
    assert lost
    # Node b never heard of these: its heartbeat leaves them out and the server takes them back
    # once the claim is older than the grace period (a quarter of the heartbeat timeout).
    cluster.wait(
        lambda: all(a["state"] != "running" for a in cluster.attempts(runs) if a["id"] in lost),
        GRACE + HEARTBEAT_TIMEOUT / 2,
        "the lost claims to be taken back",
    )
    cluster.wait_closed(runs)
    taken_back = [a for a in cluster.attempts(runs) if a["id"] in lost]
    assert {a["state"] for a in taken_back} <= {"up_for_retry", "failed"}, taken_back
    assert all("does not hold this attempt" in (a["error"] or "") for a in taken_back)
    ran = {(r, t, n) for t, r, n, _ in cluster.markers()}
    assert not any((a["run_id"], a["task_id"], a["try_number"]) in ran for a in taken_back)
    cluster.assert_invariants(runs, may_rerun=[])


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
