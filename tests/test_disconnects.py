"""Zombie generation: a request nobody reads any more is cancelled after a grace period; a client that
comes back in time (to any gateway) keeps it; a background request runs to the end regardless."""

from __future__ import annotations

import httpx
import pytest

from tests.support import Cluster, Gateway, chat_body, iter_sse, read_stream, wait_for

MODEL = "grace-sim"
GRACE = {"disconnect_grace_s": 1.0}


@pytest.fixture(scope="module")
def gateways(cluster: Cluster) -> list[Gateway]:
    cluster.worker(model=MODEL, sim_itl_ms=20, sim_default_max_tokens=2000, worker_heartbeat_s=0.2, **GRACE)
    gateways = [cluster.gateway(attach_refresh_s=0.2, **GRACE) for _ in range(2)]
    wait_for(lambda: MODEL in httpx.get(gateways[0].url + "/v1/models").text, 10, "the model")
    return gateways


def read_some_then_leave(gateway: Gateway, body: dict[str, object], count: int) -> tuple[str, str]:
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", gateway.url + "/v1/chat/completions", json=body) as response,
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
