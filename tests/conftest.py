from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Cluster, Gateway, Worker
from tokenspool.redis_server import EmbeddedRedis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A private Redis-compatible server (the bundled valkey-server) on a free loopback port."""
    with EmbeddedRedis(data_dir=tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(redis_server.url, Path(tmp_path_factory.mktemp("logs")))
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def stack(cluster: Cluster) -> tuple[list[Gateway], list[Worker]]:
    """Two gateways and two sim workers on one server, shared by a module's tests."""
    workers = [cluster.worker(sim_itl_ms=10, sim_ttft_ms=20), cluster.worker(sim_itl_ms=10, sim_ttft_ms=20)]
    gateways = [cluster.gateway(), cluster.gateway()]
    return gateways, workers
