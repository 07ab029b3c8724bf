"""Zombie generation: a request nobody reads any more is cancelled after a grace period; a client that
comes back in time (to any gateway) keeps it; a background request runs to the end regardless."""

from __future__ import annotations

import httpx
import pytest

from tests.support import EVENT_STREAM, Cluster, Gateway, chat_body, iter_sse, read_stream, wait_for, wait_for_model
from tokenspool.shared import keys

MODEL = "grace-sim"
GRACE = {"disconnect_grace_s": 1.0}


@pytest.fixture(scope="module")
def gateways(cluster: Cluster) -> list[Gateway]:
    cluster.worker(model=MODEL, sim_itl_ms=20, sim_default_max_tokens=2000, worker_heartbeat_s=0.2, **GRACE)
    gateways = [cluster.gateway(attach_refresh_s=0.2, **GRACE) for _ in range(2)]
    wait_for_model(gateways[0], MODEL)
    return gateways


def read_some_then_leave(gateway: Gateway, body: dict[str, object], count: int) -> tuple[str, str]:
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=EVENT_STREAM) as response,
    ):
        events = iter_sse(response)
        seen = [next(item for item in events if not isinstance(item, str)) for _ in range(count)]
        return response.headers["x-request-id"], seen[-1].id or ""


def test_a_request_nobody_reads_is_cancelled_after_the_grace_period(cluster: Cluster, gateways: list[Gateway]) -> None:
    request_id, _ = read_some_then_leave(gateways[0], chat_body("abandon me", max_tokens=1500, model=MODEL), 2)
    wait_for(lambda: cluster.meta(request_id).get("state") == "cancelled", 10, "the zombie to be cancelled")
    replay = read_stream("GET", f"{gateways[1].url}/v1/requests/{request_id}/events")
    error = replay.events[-2].json()["error"]
    assert error["type"] == "cancelled" and "no client was attached" in error["message"]
    assert len(replay.events) < 200, "generation stopped long before max_tokens"


def test_a_client_that_comes_back_within_the_grace_period_keeps_its_request(
    cluster: Cluster, gateways: list[Gateway]
) -> None:
    body = chat_body("i will be back", max_tokens=150, model=MODEL)
    request_id, last_id = read_some_then_leave(gateways[0], body, 3)
    rest = read_stream("GET", f"{gateways[1].url}/v1/requests/{request_id}/events", headers={"Last-Event-ID": last_id})
    assert rest.events[-1].data == "[DONE]" and len(rest.events) == 150 - 3 + 1
    assert cluster.meta(request_id)["state"] == "done"


def test_a_background_request_runs_to_the_end_without_a_client(cluster: Cluster, gateways: list[Gateway]) -> None:
    request_id, _ = read_some_then_leave(
        gateways[0], chat_body("run alone", max_tokens=120, model=MODEL, background=True), 1
    )
    wait_for(lambda: cluster.meta(request_id).get("state") in ("done", "cancelled"), 20, "the request to end")
    assert cluster.meta(request_id)["state"] == "done"
    assert cluster.meta(request_id)["completion_tokens"] == "120"


def test_queue_timeout_ends_a_request_that_waited_too_long(cluster: Cluster) -> None:
    cluster.worker(model="slow-queue", max_num_seqs=1, sim_itl_ms=20, sim_default_max_tokens=2000, queue_timeout_s=1.0)
    gateway = cluster.gateway(queue_timeout_s=1.0, queue_status_interval_s=0.2)
    wait_for_model(gateway, "slow-queue")
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST", gateway.url + "/v1/chat/completions", json=chat_body("hog", max_tokens=1000, model="slow-queue")
        ) as hog,
    ):
        hog_id = hog.headers["x-request-id"]
        wait_for(lambda: cluster.meta(hog_id).get("state") == "running", 10, "the hog to run")
        waiting = read_stream(
            "POST", gateway.url + "/v1/chat/completions", json=chat_body("patient", max_tokens=3, model="slow-queue")
        )
        http.delete(f"{gateway.url}/v1/requests/{hog_id}")
    assert any(c.startswith("queued:") for c in waiting.comments)
    error = waiting.events[-2].json()["error"]
    assert error["type"] == "queue_timeout" and "in the queue" in error["message"]
    assert cluster.meta(waiting.headers["x-request-id"])["state"] == "failed"  # type: ignore[index]


def test_deadline_ends_a_request_that_runs_too_long(cluster: Cluster) -> None:
    cluster.worker(
        model="deadline-sim", sim_itl_ms=20, sim_default_max_tokens=2000, request_deadline_s=1.0, worker_heartbeat_s=0.2
    )
    gateway = cluster.gateway()
    wait_for_model(gateway, "deadline-sim")
    stream = read_stream(
        "POST", gateway.url + "/v1/chat/completions", json=chat_body("forever", max_tokens=1500, model="deadline-sim")
    )
    error = stream.events[-2].json()["error"]
    assert error["type"] == "deadline_exceeded" and len(stream.events) < 200
    assert cluster.meta(stream.headers["x-request-id"])["state"] == "failed"  # type: ignore[index]


def test_inter_token_timeout_closes_a_silent_stream_but_not_the_request(cluster: Cluster) -> None:
    cluster.worker(model="sluggish", sim_itl_ms=1500, sim_ttft_ms=10)
    gateway = cluster.gateway(inter_token_timeout_s=0.5, heartbeat_s=0.1)
    wait_for_model(gateway, "sluggish")
    stream = read_stream(
        "POST", gateway.url + "/v1/chat/completions", json=chat_body("slow", max_tokens=3, model="sluggish")
    )
    request_id = stream.headers["x-request-id"]  # type: ignore[index]
    error = stream.events[-2].json()["error"]
    assert error["type"] == "inter_token_timeout" and "resume with Last-Event-ID" in error["message"]
    assert stream.events[-1].data == "[DONE]"
    wait_for(lambda: cluster.meta(request_id).get("state") == "done", 15, "the request to finish anyway")


def test_a_stream_read_to_its_end_leaves_no_attachment_behind(cluster: Cluster, gateways: list[Gateway]) -> None:
    # A renewal period longer than the test: the only attachment writes are the ones a stream's end makes.
    gateway = cluster.gateway(attach_refresh_s=600, **GRACE)
    short = read_stream(
        "POST", gateway.url + "/v1/chat/completions", json=chat_body("short", max_tokens=3, model=MODEL)
    )
    assert short.events[-1].data == "[DONE]" and short.headers is not None
    ended = keys.RequestKeys.of(short.headers["x-request-id"]).attached
    left, _ = read_some_then_leave(gateway, chat_body("left early", max_tokens=1500, model=MODEL), 1)
    left_key = keys.RequestKeys.of(left).attached
    wait_for(lambda: cluster.redis.exists(left_key), 10, "the grace period of the stream that left")
    assert not cluster.redis.exists(ended), "a request that ended needs no attachment, and its stream writes none"
