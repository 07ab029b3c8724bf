from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Cluster, Gateway, Worker
from tokenspool.redis_server import EmbeddedCluster, EmbeddedRedis

TEST_REDIS_VARIABLE = "TOKENSPOOL_TEST_REDIS"
"""``server`` (the default): the shared fixtures run on one embedded server; ``cluster``: on a 3-node Redis
Cluster (scripts/dev.sh test runs the end-to-end and fault files both ways). Read here only: tests' child
processes get a clean ``TOKENSPOOL_*`` environment (tests/support.py)."""


def redis_mode() -> str:
    mode = os.environ.get(TEST_REDIS_VARIABLE, "server")
    if mode not in ("server", "cluster"):
        raise pytest.UsageError(f"{TEST_REDIS_VARIABLE} must be 'server' or 'cluster', got {mode!r}")
    return mode


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "single_server(reason): the test needs one Redis server of its own (e.g. it restarts it); "
        f"it does not run with {TEST_REDIS_VARIABLE}=cluster, and the reason says why",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if redis_mode() != "cluster":
        return
    for item in items:
        marker = item.get_closest_marker("single_server")
        if marker is not None:
            reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
            if not reason:
                raise pytest.UsageError(f"{item.nodeid}: single_server needs a reason")
            item.add_marker(pytest.mark.skip(reason=f"single server only: {reason}"))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis | EmbeddedCluster]:
    """A private Redis-compatible server (the bundled valkey-server) on a free loopback port; with
    TOKENSPOOL_TEST_REDIS=cluster, a private 3-node Redis Cluster of the same binary instead."""
    if redis_mode() == "cluster":
        with EmbeddedCluster(3, data_dir=tmp_path_factory.mktemp("redis-cluster")) as cluster:
            yield cluster
        return
    with EmbeddedRedis(data_dir=tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(
    redis_server: EmbeddedRedis | EmbeddedCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    cluster = Cluster(redis_server.url, Path(tmp_path_factory.mktemp("logs")))
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def stack(cluster: Cluster) -> tuple[list[Gateway], list[Worker]]:
    """Two gateways and two sim workers on one server (or cluster), shared by a module's tests."""
    workers = [cluster.worker(sim_itl_ms=10, sim_ttft_ms=20), cluster.worker(sim_itl_ms=10, sim_ttft_ms=20)]
    gateways = [cluster.gateway(), cluster.gateway()]
    return gateways, workers
