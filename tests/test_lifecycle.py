"""A request's life: status, cancellation (queued and running), idempotent retries, waiting and heartbeats."""

from __future__ import annotations

import httpx
import pytest

from tests.support import (
    EVENT_STREAM,
    Cluster,
    Gateway,
    Worker,
    chat_body,
    iter_sse,
    read_stream,
    wait_for,
    wait_for_model,
)
from tokenspool.shared import keys

Stack = tuple[list[Gateway], list[Worker]]


def test_status_reports_a_finished_request(stack: Stack) -> None:
    (gw, _), workers = stack
    done = read_stream("POST", gw.url + "/v1/chat/completions", json=chat_body("status", max_tokens=7))
    request_id = done.headers["x-request-id"] if done.headers else ""
    status = httpx.get(f"{gw.url}/v1/requests/{request_id}").json()
    assert status["id"] == request_id and status["object"] == "tokenspool.request"
    assert status["state"] == "done" and status["finish_reason"] == "length"
    assert status["events"] == 8  # 7 deltas and the end event
    assert status["usage"]["completion_tokens"] == 7
    assert status["worker"] in {w.worker_id for w in workers}
    assert status["created"] > 0 and status["finished_at_ms"] >= status["started_at_ms"] >= status["enqueued_at_ms"]
    assert httpx.get(f"{gw.url}/v1/requests/{keys.new_request_id('chat')}").status_code == 404


def test_cancel_stops_a_running_request_within_a_step(cluster: Cluster, stack: Stack) -> None:
    (gw_a, gw_b), _ = stack
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST", gw_a.url + "/v1/chat/completions", json=chat_body("long one", max_tokens=2000)
        ) as response,
    ):
        request_id = response.headers["x-request-id"]
        events = iter_sse(response)
        for _ in range(3):
            next(item for item in events if not isinstance(item, str))
        cancelled = client.delete(f"{gw_b.url}/v1/requests/{request_id}")
        assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelling"
        rest = [item for item in events if not isinstance(item, str)]
    assert rest[-1].data == "[DONE]"
    error = rest[-2].json()["error"]
    assert error["type"] == "cancelled"
    assert len(rest) < 200, "generation went on long after the cancel"
    status = httpx.get(f"{gw_a.url}/v1/requests/{request_id}").json()
    assert status["state"] == "cancelled" and status["cancel_requested"] is True
    again = httpx.delete(f"{gw_a.url}/v1/requests/{request_id}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "request_ended"
    wait_for(lambda: all(w.running == 0 for w in cluster.live_workers()), 10, "the worker slot to be free")


def test_cancel_of_a_queued_request_ends_it_before_any_worker_runs_it(cluster: Cluster) -> None:
    cluster.worker(model="single-file", max_num_seqs=1, sim_itl_ms=10)
    gateway = cluster.gateway()
    url = gateway.url + "/v1/chat/completions"
    with httpx.Client(timeout=30) as client:
        wait_for_model(gateway, "single-file")
        with client.stream("POST", url, json=chat_body(model="single-file", max_tokens=2000)) as first:
            blocker = first.headers["x-request-id"]
            wait_for(lambda: cluster.meta(blocker).get("state") == "running", 10, "the first request to run")
            with client.stream(
                "POST", url, json=chat_body(model="single-file", max_tokens=5), headers=EVENT_STREAM
            ) as second:
                waiting_id = second.headers["x-request-id"]
                assert cluster.meta(waiting_id)["state"] == "queued"
                response = client.delete(f"{gateway.url}/v1/requests/{waiting_id}")
                assert response.status_code == 200 and response.json()["state"] == "cancelled"
                events = [item for item in iter_sse(second) if not isinstance(item, str)]
            assert [e.id for e in events[:-1]] == [keys.event_id(waiting_id, 1)]
            assert events[0].json()["error"]["type"] == "cancelled"
            client.delete(f"{gateway.url}/v1/requests/{blocker}")
        wait_for(lambda: cluster.meta(blocker).get("state") == "cancelled", 10, "the blocker to be cancelled")
        # The worker takes the cancelled request off the queue without running it.
        wait_for(lambda: cluster.redis.xlen(keys.queue_key("single-file")) == 0, 10, "the queue to drain")
        assert cluster.meta(waiting_id)["state"] == "cancelled" and "worker" not in cluster.meta(waiting_id)


def test_idempotency_key_maps_a_retry_to_the_same_request(cluster: Cluster, stack: Stack) -> None:
    (gw_a, gw_b), _ = stack
    body = chat_body("retry me", max_tokens=6)
    headers = {"Idempotency-Key": "order-1234"}
    first = read_stream("POST", gw_a.url + "/v1/chat/completions", json=body, headers=headers)
    second = read_stream("POST", gw_b.url + "/v1/chat/completions", json=body, headers=headers)
    assert first.headers and second.headers
    assert first.headers["x-request-id"] == second.headers["x-request-id"]
    assert [e.raw for e in first.events] == [e.raw for e in second.events]
    assert cluster.meta(first.headers["x-request-id"])["attempt"] == "1"
    conflict = httpx.post(gw_a.url + "/v1/chat/completions", json={**body, "max_tokens": 9}, headers=headers)
    assert conflict.status_code == 422 and conflict.json()["error"]["code"] == "idempotency_key_reused"
    plain = read_stream("POST", gw_a.url + "/v1/chat/completions", json=body)
    assert plain.headers and plain.headers["x-request-id"] != first.headers["x-request-id"]


def test_idle_streams_carry_heartbeat_comments(cluster: Cluster) -> None:
    cluster.worker(model="slowpoke", sim_itl_ms=700, sim_ttft_ms=10)
    gateway = cluster.gateway(heartbeat_s=0.2)
    wait_for_model(gateway, "slowpoke")
    stream = read_stream("POST", gateway.url + "/v1/chat/completions", json=chat_body(model="slowpoke", max_tokens=3))
    assert "ping" in stream.comments
    assert stream.events[-1].data == "[DONE]" and len(stream.events) == 4


@pytest.mark.parametrize("stream", [True, False])
def test_non_streaming_and_streaming_requests_share_one_record(stack: Stack, stream: bool) -> None:
    gw = stack[0][0]
    response = httpx.post(gw.url + "/v1/chat/completions", json=chat_body("record", max_tokens=4, stream=stream))
    request_id = response.headers["x-request-id"]
    replay = read_stream("GET", f"{gw.url}/v1/requests/{request_id}/events")
    assert len(replay.events) == 5 and replay.events[-1].data == "[DONE]"


def test_engine_failure_after_streaming_started_is_an_error_event(cluster: Cluster) -> None:
    cluster.worker(model="fragile", sim_fail_marker="BREAK")
    gateway = cluster.gateway()
    wait_for_model(gateway, "fragile")
    stream = read_stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json=chat_body("please BREAK here", max_tokens=10, model="fragile"),
    )
    request_id = stream.headers["x-request-id"] if stream.headers else ""
    assert [e.id for e in stream.events] == [keys.event_id(request_id, 1), keys.event_id(request_id, 2), None]
    assert stream.events[0].json()["choices"][0]["delta"]["content"]
    error = stream.events[1].json()["error"]
    assert error["type"] == "engine_error" and "simulated engine failure" in error["message"]
    assert stream.events[2].data == "[DONE]"
    assert httpx.get(f"{gateway.url}/v1/requests/{request_id}").json()["state"] == "failed"
    plain = httpx.post(
        gateway.url + "/v1/chat/completions",
        json=chat_body("BREAK again", max_tokens=10, model="fragile", stream=False),
    )
    assert plain.status_code == 500 and plain.json()["error"]["type"] == "engine_error"
    healthy = httpx.post(
        gateway.url + "/v1/chat/completions", json=chat_body("fine", max_tokens=3, model="fragile", stream=False)
    )
    assert healthy.status_code == 200, "the worker goes on after a failed request"
