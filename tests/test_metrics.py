"""Metrics are scraped after real traffic and their values checked, not just their names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import ClientConnection, connect

from tests.support import Cluster, chat_body, read_stream, wait_for, wait_for_model
from tokenspool.gateway.proto import tokenspool_chat_pb2 as pb
from tokenspool.gateway.proto import tokenspool_chat_pb2_grpc as pb_grpc
from tokenspool.redis_server import free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url).text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape_once(url: str, ready: Callable[[Samples], bool], what: str) -> Samples:
    """The first scrape that is ``ready``: a gateway counts a stream as ended when its side of the stream ends,
    just after it wrote [DONE], which the client may have read first."""
    return wait_for(lambda: samples if ready(samples := scrape(url)) else None, 10, what)


def test_gateway_and_worker_metrics_count_real_traffic(cluster: Cluster) -> None:
    port = free_port()
    cluster.worker(model="metered", metrics_port=port, sim_itl_ms=5)
    gateway = cluster.gateway()
    wait_for_model(gateway, "metered")
    streams = [
        read_stream(
            "POST", gateway.url + "/v1/chat/completions", json=chat_body(f"m{i}", max_tokens=5, model="metered")
        )
        for i in range(3)
    ]
    plain = httpx.post(
        gateway.url + "/v1/chat/completions", json=chat_body(max_tokens=5, model="metered", stream=False)
    )
    assert plain.status_code == 200
    assert httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(model="metered", n=3)).status_code == 400
    first = streams[0]
    request_id = first.headers["x-request-id"] if first.headers else ""
    read_stream(
        "GET", f"{gateway.url}/v1/requests/{request_id}/events", headers={"Last-Event-ID": first.events[1].id or ""}
    )

    ended = ("tokenspool_gateway_streams_ended_total", (("how", "done"),))
    g = scrape_once(gateway.url + "/metrics", lambda samples: samples.get(ended) == 4, "the four streams to end")
    route = (("route", "/v1/chat/completions"),)
    assert g[("tokenspool_gateway_responses_total", (*route, ("status", "200")))] == 4
    assert g[("tokenspool_gateway_responses_total", (*route, ("status", "400")))] == 1
    assert g[("tokenspool_gateway_time_to_first_token_seconds_count", ())] == 3
    assert 0 < g[("tokenspool_gateway_time_to_first_token_seconds_sum", ())] < 30
    assert g[("tokenspool_gateway_resume_time_to_first_event_seconds_count", ())] == 1
    assert g[("tokenspool_gateway_resumes_total", ())] == 1
    assert g[ended] == 4
    assert g[("tokenspool_gateway_streams_active", ())] == 0
    assert g[("tokenspool_gateway_time_per_output_token_seconds_count", ())] == 4
    assert g[("tokenspool_gateway_replayed_events_total", ())] >= 3  # the resume replayed from Redis
    # The resume came after event 2 of a stored stream of 6 (5 deltas and the end marker): 4 to replay.
    assert g[("tokenspool_gateway_resume_backlog_events_count", ())] == 1
    assert g[("tokenspool_gateway_resume_backlog_events_sum", ())] == 4
    assert g[("tokenspool_gateway_errors_total", (("code", "unsupported_parameter"), ("status", "400")))] == 1
    assert g.get(("tokenspool_gateway_handovers_total", ()), 0) == 0

    w = scrape(f"http://127.0.0.1:{port}/metrics")
    assert w[("tokenspool_worker_output_tokens_total", ())] == 20
    assert w[("tokenspool_worker_requests_total", (("outcome", "done"),))] == 4
    assert w[("tokenspool_worker_queue_wait_seconds_count", ())] == 4
    assert w[("tokenspool_worker_capacity", ())] == 64
    assert w[("tokenspool_worker_redis_write_seconds_count", ())] >= 1
    assert w[("tokenspool_worker_claims_total", ())] == 4
    assert w[("tokenspool_worker_takeovers_total", ())] == 0
    assert w[("tokenspool_worker_engine_step_seconds_count", ())] >= 20  # one step per token at least


def test_a_reply_whose_last_token_ends_it_is_written_in_one_round_trip_with_its_end(cluster: Cluster) -> None:
    """A choice's last delta waits for the request's end, which follows at once: a one-token reply costs the
    worker one append round trip (it was two: the token, then the end, each waking the relaying gateway)."""
    port = free_port()
    cluster.worker(model="one-token", metrics_port=port, sim_itl_ms=0, sim_ttft_ms=0)
    gateway = cluster.gateway()
    wait_for_model(gateway, "one-token")
    for i in range(5):
        got = read_stream(
            "POST", gateway.url + "/v1/chat/completions", json=chat_body(f"t{i}", max_tokens=1, model="one-token")
        )
        finishes = [e.json()["choices"][0]["finish_reason"] for e in got.events if e.data != "[DONE]"]
        assert finishes[-1] == "length" and got.events[-1].data == "[DONE]", got.events
    w = scrape(f"http://127.0.0.1:{port}/metrics")
    assert w[("tokenspool_worker_requests_total", (("outcome", "done"),))] == 5
    assert w[("tokenspool_worker_redis_write_seconds_count", ())] == 5


def test_gateways_sharing_a_metrics_directory_each_report_the_traffic_of_all(cluster: Cluster, tmp_path: Path) -> None:
    """What `tokenspool up --gateways N` relies on: whichever process a scrape reaches reports every process."""
    shared_dir = str(tmp_path / "gateway-metrics")
    cluster.worker(model="pooled", sim_itl_ms=2)
    first = cluster.gateway(metrics_multiproc_dir=shared_dir)
    second = cluster.gateway(metrics_multiproc_dir=shared_dir)
    wait_for_model(second, "pooled")
    for gateway, count in ((first, 3), (second, 2)):
        for i in range(count):
            body = chat_body(f"p{i}", max_tokens=3, model="pooled")
            assert read_stream("POST", gateway.url + "/v1/chat/completions", json=body).events[-1].data == "[DONE]"
    route_ok = ("tokenspool_gateway_responses_total", (("route", "/v1/chat/completions"), ("status", "200")))
    active = ("tokenspool_gateway_streams_active", ())
    for gateway in (first, second):
        samples = scrape_once(gateway.url + "/metrics", lambda got: got[active] == 0, "the streams to close")
        assert samples[active] == 0
        assert samples[route_ok] == 5
        assert samples[("tokenspool_gateway_time_to_first_token_seconds_count", ())] == 5


def ws_messages_until_done(ws: ClientConnection, request_id: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while not messages or messages[-1]["type"] != "done":
        message = orjson.loads(ws.recv(timeout=15))
        if message.get("request_id") == request_id:
            messages.append(message)
    return messages


def test_websocket_and_grpc_streams_count_in_every_stream_metric(cluster: Cluster) -> None:
    """A stream is a stream whatever carries it: open ones are active, and each ended one has its time to
    first token, time per token, duration and ending counted, as over SSE."""
    cluster.worker(model="wired", sim_itl_ms=5)
    grpc_port = free_port()
    gateway = cluster.gateway(grpc_port=grpc_port)
    wait_for_model(gateway, "wired")
    metrics_url = gateway.url + "/metrics"
    active = ("tokenspool_gateway_streams_active", ())
    ws_url = gateway.url.replace("http://", "ws://", 1) + "/v1/ws"
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel, connect(ws_url, open_timeout=10) as ws:
        grpc.channel_ready_future(channel).result(timeout=30)  # the gRPC port itself, not only HTTP
        stub = pb_grpc.ChatServiceStub(channel)
        long_request = {"prompt": "go on", "model": "wired", "max_tokens": 5000, "ignore_eos": True}
        ws.send(orjson.dumps(long_request).decode())
        ws_request_id = orjson.loads(ws.recv(timeout=15))["request_id"]
        grpc_call = stub.StreamChat(
            pb.ChatRequest(model="wired", prompt="go on", max_tokens=5000, ignore_eos=True), timeout=30
        )
        grpc_responses = iter(grpc_call)
        grpc_request_id = next(grpc_responses).request_id
        assert next(grpc_responses).kind == pb.ChatResponse.DELTA
        wait_for(lambda: scrape(metrics_url)[active] == 2, 10, "both streams to count as active")
        for request_id in (ws_request_id, grpc_request_id):
            assert httpx.delete(f"{gateway.url}/v1/requests/{request_id}").status_code in (200, 202)
        assert ws_messages_until_done(ws, ws_request_id)[-1]["state"] == "cancelled"
        assert list(grpc_responses)[-1].error.code == "cancelled"

        ws.send(orjson.dumps({"prompt": "short", "model": "wired", "max_tokens": 5}).decode())
        short_id = orjson.loads(ws.recv(timeout=15))["request_id"]
        assert ws_messages_until_done(ws, short_id)[-1]["state"] == "done"
        short_call = list(stub.StreamChat(pb.ChatRequest(model="wired", prompt="short", max_tokens=5), timeout=30))
        assert short_call[-1].kind == pb.ChatResponse.END

    def counted(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> bool:
        return samples[active] == 0 and samples[("tokenspool_gateway_streams_ended_total", (("how", "done"),))] == 4

    g = scrape_once(metrics_url, counted, "the four streams to end")
    assert g[("tokenspool_gateway_time_to_first_token_seconds_count", ())] == 4
    assert 0 < g[("tokenspool_gateway_time_to_first_token_seconds_sum", ())] < 30
    assert g[("tokenspool_gateway_stream_duration_seconds_count", ())] == 4
    assert g[("tokenspool_gateway_time_per_output_token_seconds_count", ())] == 4
    assert g[("tokenspool_gateway_events_sent_total", ())] >= 2 * 6 + 2 * 3  # the short ones' 5 deltas + end
