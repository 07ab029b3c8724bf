"""Redis connections per process stay bounded whatever the load: a gateway and a worker carrying hundreds of
streams at once hold no more connections than with one (each names its connections, so CLIENT LIST shows
which process holds which)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.support import EVENT_STREAM, Cluster, Gateway, Worker, chat_body, wait_for_model
from tokenspool.client_core import SSEDecoder, SSEMessage
from tokenspool.shared import keys
from tokenspool.shared.settings import CommonSettings

MODEL = "tokenspool-sim"
STREAMS = 300
TOKENS = 12
POOL = CommonSettings().redis_pool_connections
GATEWAY_BOUND = POOL + 2
"""The command pool, the relay's one blocking XREAD, and one control connection that sends CLIENT UNBLOCK."""
WORKER_BOUND = POOL + 1
"""The command pool and the queue read (a blocking XREADGROUP)."""


@pytest.fixture(scope="module")
def pair(cluster: Cluster) -> tuple[Gateway, Worker]:
    worker = cluster.worker(sim_itl_ms=10, sim_ttft_ms=10, max_num_seqs=STREAMS)
    gateway = cluster.gateway()
    wait_for_model(gateway, MODEL)
    return gateway, worker


def connections_by_process(cluster: Cluster) -> Counter[str]:
    """Connections per process, from their names (``tokenspool:<component>:<id>:<role>``)."""
    counts: Counter[str] = Counter()
    for client in cluster.redis.client_list():
        name = client.get("name", "")
        if name.startswith("tokenspool:"):
            counts[name.rpartition(":")[0]] += 1
    return counts


async def stream_all(gateway: Gateway, cluster: Cluster) -> tuple[list[list[int]], Counter[str]]:
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
        during: Counter[str] = await asyncio.to_thread(connections_by_process, cluster)
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
    assert during[gateway_name] >= 2, f"the gateway names its connections: {during}"
    assert during[worker_name] >= 2, f"the worker names its connections: {during}"
    assert during[gateway_name] <= GATEWAY_BOUND, f"{STREAMS} streams open: {during}"
    assert during[worker_name] <= WORKER_BOUND, f"{STREAMS} streams running: {during}"
    after = connections_by_process(cluster)
    assert after[gateway_name] <= GATEWAY_BOUND and after[worker_name] <= WORKER_BOUND, after
