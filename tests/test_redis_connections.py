"""Redis connections per process stay bounded whatever the load: a gateway and a worker carrying hundreds of
streams at once hold no more connections than with one (each names its connections, so CLIENT LIST shows
which process holds which)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest
import redis

from tests.support import EVENT_STREAM, Cluster, Gateway, Worker, chat_body, wait_for_model
from tokenspool.client_core import SSEDecoder, SSEMessage
from tokenspool.shared import keys
from tokenspool.shared.settings import CommonSettings

MODEL = "tokenspool-sim"
STREAMS = 500
TOKENS = 12
POOL = CommonSettings().redis_pool_connections
GATEWAY_BOUND = POOL + 2
"""The command pool, the relay's one blocking XREAD, and one control connection that sends CLIENT UNBLOCK
(per node on a cluster, where the relay has one reader per hash slot with live streams: up to 16 in all)."""
WORKER_BOUND = POOL + 1
"""The command pool and the queue read (a blocking XREADGROUP); per node on a cluster."""


@pytest.fixture(scope="module")
def pair(cluster: Cluster) -> tuple[Gateway, Worker]:
    worker = cluster.worker(sim_itl_ms=10, sim_ttft_ms=10, max_num_seqs=STREAMS)
    gateway = cluster.gateway()
    wait_for_model(gateway, MODEL)
    return gateway, worker


def connections_by_process(cluster: Cluster) -> Counter[tuple[str, str]]:
    """Connections per (server, process), from their names (``tokenspool:<component>:<id>:<role>``): one
    server, or each node of a Redis Cluster (the bounds hold per node there)."""
    redis_client: Any = cluster.redis
    nodes = redis_client.get_primaries() if isinstance(redis_client, redis.RedisCluster) else [None]
    counts: Counter[tuple[str, str]] = Counter()
    for node in nodes:
        clients = redis_client.client_list() if node is None else redis_client.client_list(target_nodes=node)
        for client in clients:
            name = client.get("name", "")
            if name.startswith("tokenspool:"):
                counts[(str(node), name.rpartition(":")[0])] += 1
    return counts


CLUSTER_DISCOVERY = 1
"""On a Redis Cluster, the connection each cluster client keeps to the seed node it read the slot map from."""


def readers_beyond(counts: Counter[tuple[str, str]], process: str, bound: int) -> int:
    """A process's connections beyond ``bound`` on each node, added up: a gateway's relay readers on a
    cluster, one per hash slot with live streams (16 at most, all nodes together)."""
    return sum(max(0, n - bound) for (_, name), n in counts.items() if name == process)


async def stream_all(gateway: Gateway, cluster: Cluster) -> tuple[list[list[int]], Counter[tuple[str, str]]]:
    """Open STREAMS streams at once; once every one has its first event, count connections; then read all."""
    every_stream_started = asyncio.Event()
    started = 0

    async def one(client: httpx.AsyncClient, index: int) -> list[int]:
        nonlocal started
        body = chat_body(f"stream {index}", max_tokens=TOKENS, seed=index, model=MODEL)
        seqs: list[int] = []
        decoder = SSEDecoder()
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=EVENT_STREAM) as response:
            assert response.status_code == 200, await response.aread()
            async for chunk in response.aiter_bytes():
                for event in decoder.feed(chunk):
                    if isinstance(event, SSEMessage) and event.id is not None:
                        seqs.append(keys.parse_event_id(event.id)[1])
                        if len(seqs) == 1:
                            started += 1
                            if started == STREAMS:
                                every_stream_started.set()
                            await asyncio.wait_for(every_stream_started.wait(), 60)
        return seqs

    limits = httpx.Limits(max_connections=STREAMS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=gateway.url, limits=limits, timeout=60) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(STREAMS)]
        await asyncio.wait_for(every_stream_started.wait(), 60)
        during = await asyncio.to_thread(connections_by_process, cluster)
        results: list[Any] = await asyncio.gather(*tasks)
    return results, during


def test_connections_per_process_stay_bounded_under_hundreds_of_concurrent_streams(
    cluster: Cluster, pair: tuple[Gateway, Worker]
) -> None:
    gateway, worker = pair
    results, during = asyncio.run(stream_all(gateway, cluster))
    for seqs in results:
        assert seqs == list(range(1, TOKENS + 2)), "every stream gets every event once, in order"
    gateway_name = f"tokenspool:gateway:{gateway.proc.pid}"
    worker_name = f"tokenspool:worker:{worker.worker_id}"
    for counts in (during, connections_by_process(cluster)):
        gateway_counts = [n for (_, name), n in counts.items() if name == gateway_name]
        worker_counts = [n for (_, name), n in counts.items() if name == worker_name]
        assert sum(gateway_counts) >= 2 and sum(worker_counts) >= 2, f"processes name their connections: {counts}"
        if isinstance(cluster.redis, redis.RedisCluster):
            # Per node: the worker's two clients each keep a discovery connection; the gateway has its control
            # connection and its client's discovery connection, and its readers spread over the nodes.
            assert max(worker_counts) <= WORKER_BOUND + 2 * CLUSTER_DISCOVERY, f"{STREAMS} streams: {counts}"
            beyond = readers_beyond(counts, gateway_name, POOL + 1 + CLUSTER_DISCOVERY)
            assert beyond <= keys.PARTITIONS, f"{STREAMS} streams: {counts}"
        else:
            assert max(worker_counts) <= WORKER_BOUND, f"{STREAMS} streams: {counts}"
            assert max(gateway_counts) <= GATEWAY_BOUND, f"{STREAMS} streams: {counts}"
