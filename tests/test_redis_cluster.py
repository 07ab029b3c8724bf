"""tokenspool on a Redis Cluster: request streams spread over the nodes by partition, one gateway relays
them all (one XREAD per slot, each on the node that owns it), and each model's workers read their queue on
whichever node holds it. Always runs on a private 3-node cluster, whatever TOKENSPOOL_TEST_REDIS says."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.cluster

from tests.support import (
    EVENT_STREAM,
    Cluster,
    Proc,
    chat_body,
    clean_env,
    content_of,
    iter_sse,
    read_stream,
    wait_for,
    wait_for_model,
)
from tokenspool.redis_server import EmbeddedCluster
from tokenspool.shared import keys
from tokenspool.shared.redis_client import RedisTarget, connect_sync


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(3, data_dir=tmp_path_factory.mktemp("redis-cluster")) as server:
        yield server


@pytest.fixture(scope="module")
def stack(redis_cluster: EmbeddedCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    stack = Cluster(redis_cluster.url, Path(tmp_path_factory.mktemp("logs")))
    try:
        yield stack
    finally:
        stack.close()


def node_of(stack: Cluster, key: str) -> str:
    node = stack.redis.get_node_from_key(key)
    return f"{node.host}:{node.port}"


def test_the_sixteen_partitions_are_spread_over_every_node(stack: Cluster, redis_cluster: EmbeddedCluster) -> None:
    nodes = {node_of(stack, keys.partition_slot_key(p)) for p in range(keys.PARTITIONS)}
    assert nodes == {f"127.0.0.1:{port}" for port in redis_cluster.ports}


def test_one_gateway_relays_streams_stored_on_different_nodes(stack: Cluster) -> None:
    stack.worker(model="spread", sim_itl_ms=5, sim_ttft_ms=5)
    gateway = stack.gateway()
    wait_for_model(gateway, "spread")

    def one(i: int) -> tuple[str, str, int]:
        body = chat_body(f"stream {i}", max_tokens=20, model="spread", seed=i)
        stream = read_stream("POST", gateway.url + "/v1/chat/completions", json=body)
        assert stream.headers is not None and stream.events[-1].data == "[DONE]"
        return stream.headers["x-request-id"], content_of(stream.events), len(stream.events)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(24)))
    event_nodes = {node_of(stack, keys.RequestKeys.of(rid).events) for rid, _, _ in results}
    assert len(event_nodes) >= 2, f"24 requests all landed on {event_nodes}"
    for request_id, text, count in results:
        assert text and count == 21, (request_id, count)  # 20 token chunks (the last with its finish), [DONE]
        stored = stack.redis.xlen(keys.RequestKeys.of(request_id).events)
        assert stored == 21, f"{request_id}: {stored} events stored"  # 20 deltas and the end event


def test_workers_read_each_queue_on_the_node_that_holds_it(stack: Cluster) -> None:
    # Two models whose queues hash to different nodes, found among a few candidate names.
    by_node: dict[str, str] = {}
    for name in (f"shard-model-{i}" for i in range(20)):
        by_node.setdefault(node_of(stack, keys.queue_key(name)), name)
    assert len(by_node) >= 2
    (node_a, model_a), (node_b, model_b) = list(by_node.items())[:2]
    assert node_a != node_b
    for model in (model_a, model_b):
        stack.worker(model=model, sim_itl_ms=5, sim_ttft_ms=5)
    gateway = stack.gateway()
    for model in (model_a, model_b):
        wait_for_model(gateway, model)
        stream = read_stream(
            "POST", gateway.url + "/v1/chat/completions", json=chat_body("hi", max_tokens=3, model=model)
        )
        assert stream.events[-1].data == "[DONE]" and content_of(stream.events).count(" ") == 2  # 3 words

        def acknowledged(queue: str = keys.queue_key(model)) -> bool:
            groups = stack.redis.xinfo_groups(queue)
            group = next(g for g in groups if g["name"] in (keys.WORKER_GROUP, keys.WORKER_GROUP.encode()))
            return bool(group["entries-read"] >= 1 and group["pending"] == 0)

        wait_for(acknowledged, 10, f"the worker of {model} to read and acknowledge its queue entry")


def test_redis_command_serves_an_embedded_cluster(tmp_path: Path) -> None:
    server = Proc(["redis", "--cluster", "3", "--port", "0"], tmp_path / "redis.log", clean_env(None))
    try:
        wait_for(lambda: "export TOKENSPOOL_REDIS_URL=" in server.log(), 30, "the cluster banner")
        url = server.log().split("export TOKENSPOOL_REDIS_URL=")[1].split()[0]
        assert url.startswith("redis+cluster://127.0.0.1:")
        client: Any = connect_sync(RedisTarget(url))
        try:
            assert len(client.get_primaries()) == 3
            client.set("ts:{p1}:probe", "1")
            client.set("ts:{p2}:probe", "2")
            assert client.get("ts:{p1}:probe") == b"1" and client.get("ts:{p2}:probe") == b"2"
        finally:
            client.close()
        assert server.stop() == 0
    finally:
        if server.alive():
            server.kill()


def move_slot(redis_cluster: EmbeddedCluster, slot: int, source_port: int, target_port: int) -> int:
    """Reshard one slot from one node to another as redis-cli --cluster reshard does (IMPORTING/MIGRATING,
    MIGRATE its keys, then SETSLOT NODE everywhere); the number of keys moved."""
    nodes: dict[int, Any] = {
        port: redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) for port in redis_cluster.ports
    }
    try:
        source, target = nodes[source_port], nodes[target_port]
        source_id, target_id = source.execute_command("CLUSTER MYID"), target.execute_command("CLUSTER MYID")
        target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        moved = 0
        while batch := source.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            source.execute_command("MIGRATE", "127.0.0.1", target_port, "", 0, 5000, "KEYS", *batch)
            moved += len(batch)
        for node in (target, source, *(n for p, n in nodes.items() if p not in (source_port, target_port))):
            node.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        return moved
    finally:
        for node in nodes.values():
            node.close()


def test_a_stream_goes_on_when_its_slot_moves_to_another_node(stack: Cluster, redis_cluster: EmbeddedCluster) -> None:
    stack.worker(model="resharded", sim_itl_ms=40, sim_ttft_ms=5)
    gateway = stack.gateway()
    wait_for_model(gateway, "resharded")
    body = chat_body("moving", max_tokens=60, model="resharded")
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=EVENT_STREAM) as response,
    ):
        request_id = response.headers["x-request-id"]
        events_key = keys.RequestKeys.of(request_id).events
        items = iter_sse(response)
        seen = [next(item for item in items if not isinstance(item, str)) for _ in range(5)]
        before = stack.redis.get_node_from_key(events_key)
        target_port = next(port for port in redis_cluster.ports if port != int(before.port))
        moved = move_slot(redis_cluster, redis.cluster.key_slot(events_key.encode()), int(before.port), target_port)
        seen += [item for item in items if not isinstance(item, str)]
    assert moved >= 3, "the request's keys (meta, job, events) moved with their slot"
    owner = redis.Redis(port=target_port).execute_command(
        "CLUSTER", "COUNTKEYSINSLOT", redis.cluster.key_slot(events_key.encode())
    )
    assert owner >= 3
    assert seen[-1].data == "[DONE]" and "error" not in seen[-2].data, seen[-2].data
    ids = [event.id for event in seen[:-1]]
    assert ids == [f"{request_id}:{n}" for n in range(1, 61)], "every event once, in order, across the move"
    replay = read_stream("GET", f"{gateway.url}/v1/requests/{request_id}/events", headers={"Last-Event-ID": ids[0]})
    assert [e.id for e in replay.events[:-1]] == ids[1:]


def test_soak_on_a_cluster_kills_workers_and_reports_only_ok(tmp_path: Path) -> None:
    argv = ["soak", "--redis-cluster", "3", "--trials", "3", "--streams", "3", "--log-dir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "tokenspool", *argv], env=clean_env(None), capture_output=True, text=True, timeout=240
    )
    logs = "".join(f"\n== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert "on a 3-node Redis Cluster" in result.stdout
    assert "verdicts: ok 9" in result.stdout and "failover gap" in result.stdout, result.stdout
