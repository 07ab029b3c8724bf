"""Operators drain and rebalance workers under load without losing or repeating a token."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.support import (
    EVENT_STREAM,
    Cluster,
    Gateway,
    Worker,
    chat_body,
    clean_env,
    content_of,
    iter_sse,
    read_stream,
    wait_for,
    wait_for_model,
)
from tokenspool.control import plan_rebalance
from tokenspool.shared import handover, keys, wire

FAST = {
    "lease_timeout_s": 1.0,
    "worker_heartbeat_s": 0.2,
    "sim_itl_ms": 20,
    "sim_ttft_ms": 10,
    "sim_default_max_tokens": 1000,
}


def run_cli(cluster: Cluster, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokenspool", *args],
        env=clean_env(cluster.redis_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start(cluster: Cluster, gateway: Gateway, model: str, **extra: object) -> Worker:
    worker = cluster.worker(model=model, **FAST, **extra)
    wait_for_model(gateway, model)
    return worker


@pytest.fixture(scope="module")
def gateway(cluster: Cluster) -> Gateway:
    return cluster.gateway()


def test_drain_lets_running_requests_finish_then_stops_the_worker(cluster: Cluster, gateway: Gateway) -> None:
    draining = start(cluster, gateway, "drain-model")
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST", gateway.url + "/v1/chat/completions", json=chat_body("drain", max_tokens=80, model="drain-model")
        ) as response,
    ):
        request_id = response.headers["x-request-id"]
        events = iter_sse(response)
        next(item for item in events if not isinstance(item, str))
        successor = start(cluster, gateway, "drain-model")
        command = run_cli(cluster, "drain", draining.worker_id, "--wait")
        rest = [item for item in events if not isinstance(item, str)]
    out, err = command.communicate(timeout=60)
    assert command.returncode == 0, err
    assert f"worker {draining.worker_id} stopped" in out
    assert rest[-1].data == "[DONE]" and len(rest) == 80
    assert cluster.meta(request_id)["attempt"] == "1", "a plain drain does not move the request"
    assert draining.proc.process.wait(10) == 0
    after = read_stream("POST", gateway.url + "/v1/chat/completions", json=chat_body(max_tokens=3, model="drain-model"))
    assert cluster.meta(after.headers["x-request-id"])["worker"] == successor.worker_id  # type: ignore[index]


def test_drain_with_migrate_hands_running_requests_over_at_once(cluster: Cluster, gateway: Gateway) -> None:
    leaving = start(cluster, gateway, "migrate-model")
    body = chat_body("migrate me", max_tokens=300, model="migrate-model", seed=3)
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=EVENT_STREAM) as response,
    ):
        request_id = response.headers["x-request-id"]
        items = iter_sse(response)
        head = [next(item for item in items if not isinstance(item, str)) for _ in range(3)]
        start(cluster, gateway, "migrate-model")
        began = time.monotonic()
        command = run_cli(cluster, "drain", leaving.worker_id, "--migrate", "--wait")
        _out, err = command.communicate(timeout=60)
        stopped_after = time.monotonic() - began
        rest = list(items)
    assert command.returncode == 0, err
    assert stopped_after < 4, f"a migrating worker should stop at once, took {stopped_after:.1f}s"
    comments = [c for c in rest if isinstance(c, str)]
    events = head + [e for e in rest if not isinstance(e, str)]
    assert any(handover.parse_comment(c) is not None for c in comments), "the handover is announced"
    stored = [
        wire.decode(f[b"d"], wire.Event) for _i, f in cluster.redis.xrange(keys.RequestKeys.of(request_id).events)
    ]
    ids = [e.id for e in events if e.data != "[DONE]"]
    expected = [keys.event_id(request_id, n) for n, ev in enumerate(stored, 1) if ev.kind == "delta"]
    assert ids == expected, "lost, duplicated or out-of-order events"
    assert sum(len(ev.token_ids) for ev in stored if ev.kind == "delta") == 300
    assert cluster.meta(request_id)["attempt"] == "2" and leaving.proc.process.wait(10) == 0
    uninterrupted = read_stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout_s=60)
    assert content_of(events) == content_of(uninterrupted.events)


def test_rebalance_moves_running_requests_to_a_new_idle_worker(cluster: Cluster, gateway: Gateway) -> None:
    busy = start(cluster, gateway, "balance-model", max_num_seqs=8)
    with httpx.Client(timeout=60) as http:
        streams = [
            http.stream(
                "POST",
                gateway.url + "/v1/chat/completions",
                json=chat_body(f"balance {i}", max_tokens=250, model="balance-model", seed=i),
            )
            for i in range(4)
        ]
        responses = [s.__enter__() for s in streams]
        ids = [r.headers["x-request-id"] for r in responses]
        wait_for(lambda: all(cluster.meta(i).get("state") == "running" for i in ids), 10, "all four to run")
        newcomer = start(cluster, gateway, "balance-model", max_num_seqs=8)
        command = run_cli(cluster, "rebalance")
        out, err = command.communicate(timeout=30)
        assert command.returncode == 0, err
        assert f"worker {busy.worker_id} hands 2 running request(s)" in out
        results = []
        for response, stream in zip(responses, streams, strict=True):
            results.append([item for item in iter_sse(response) if not isinstance(item, str)])
            stream.__exit__(None, None, None)
    holders = [cluster.meta(i)["worker"] for i in ids]
    assert holders.count(newcomer.worker_id) == 2 and holders.count(busy.worker_id) == 2
    for request_id, events in zip(ids, results, strict=True):
        assert events[-1].data == "[DONE]"
        assert cluster.meta(request_id)["completion_tokens"] == "250"


def test_rebalance_plan_evens_out_load_within_spare_capacity() -> None:
    def info(worker_id: str, running: int, capacity: int) -> wire.WorkerInfo:
        return wire.WorkerInfo(worker_id, "m", "sim", capacity, running, "active", "h", 1, 0, 0)

    assert plan_rebalance([info("a", 4, 8), info("b", 0, 8)]) == {"a": 2}
    assert plan_rebalance([info("a", 6, 8), info("b", 0, 1)]) == {"a": 1}
    assert plan_rebalance([info("a", 3, 8), info("b", 3, 8)]) == {}
    assert plan_rebalance([info("a", 5, 8)]) == {}


def test_drain_of_an_unknown_worker_is_refused(cluster: Cluster) -> None:
    command = run_cli(cluster, "drain", "nobody")
    _out, err = command.communicate(timeout=30)
    assert command.returncode == 2 and "no live worker 'nobody'" in err


def test_status_reports_running_waiting_lag_and_pending_per_worker(cluster: Cluster, gateway: Gateway) -> None:
    import contextlib
    import json

    worker = start(cluster, gateway, "status-model", max_num_seqs=1)
    with httpx.Client(timeout=30) as client, contextlib.ExitStack() as streams:
        ids = []
        for i in range(3):
            body = chat_body(f"status {i}", max_tokens=1000, model="status-model")
            response = streams.enter_context(client.stream("POST", gateway.url + "/v1/chat/completions", json=body))
            ids.append(response.headers["x-request-id"])
        wait_for(lambda: cluster.meta(ids[0]).get("state") == "running", 10, "the first request to run")
        wait_for(
            lambda: any(w.worker_id == worker.worker_id and w.running == 1 for w in cluster.live_workers()),
            10,
            "the worker's heartbeat to report it",
        )
        report = subprocess.run(
            [sys.executable, "-m", "tokenspool", "status", "--json"],
            env=clean_env(cluster.redis_url),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert report.returncode == 0, report.stderr
        model = json.loads(report.stdout)["models"]["status-model"]
        assert (model["running"], model["waiting"], model["group_lag"]) == (1, 2, 2)
        assert model["pending_per_worker"] == {worker.worker_id: 1}
        mine = [w for w in json.loads(report.stdout)["workers"] if w["id"] == worker.worker_id]
        assert mine and (mine[0]["running"], mine[0]["capacity"], mine[0]["state"]) == (1, 1, "active")
        table = subprocess.run(
            [sys.executable, "-m", "tokenspool", "status"],
            env=clean_env(cluster.redis_url),
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        assert f"{worker.worker_id}=1" in table and "GROUP LAG" in table
        for request_id in ids:
            assert client.delete(f"{gateway.url}/v1/requests/{request_id}").status_code in (200, 202)
    worker.proc.stop()
