"""One fault cluster per module: PostgreSQL, two replicas, haproxy, two namespaced nodes.

Every scenario restores what it broke before it returns, so scenarios are independent of their
order; each checks the invariants on the runs it triggered itself.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from faults import netns
from faults.cluster import Cluster
from server.postgres import PostgresCluster, own_cluster


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    with own_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def cluster(postgres: PostgresCluster) -> Iterator[Cluster]:
    if os.geteuid() != 0:
        if os.environ.get("PRIVSEP_TESTS_STRICT") == "1":
            pytest.fail("the fault suite needs root: network namespaces and sandbox uids")
        pytest.skip("the fault suite needs root: network namespaces and sandbox uids")
    netns.reap_stale()
    from stack import short_home

    home = short_home("pfault-")
    made = Cluster(postgres, home)
    try:
        made.start()
        yield made
    finally:
        try:
            made.stop()
        finally:
            shutil.rmtree(home, ignore_errors=True)
