"""Text that cannot be stored (a lone UTF-16 surrogate, which JSON's ``\\ud800`` escape can carry) in any
field is a 400 that names the field, over HTTP, WebSocket and gRPC alike, and a refused request holds
nothing: no open-stream place, no per-minute count, no key written."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import orjson
import pytest
from websockets.sync.client import connect

from tests.support import Cluster, Gateway, chat_body, read_stream, wait_for, wait_for_model
from tokenspool.gateway.proto import tokenspool_chat_pb2 as pb
from tokenspool.redis_server import free_port
from tokenspool.shared import keys

MODEL = "tokenspool-sim"
KEY = "sk-bad-text-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONE = "\ud800"
"""Sent as the JSON escape ``\\ud800`` (json.dumps writes it so): valid JSON, but no Unicode text."""


def raw_json(body: dict[str, Any]) -> bytes:
    """The body as JSON with lone surrogates written as escapes (``ensure_ascii``), as a client sends them."""
    import json

    return json.dumps(body).encode()


CHAT_FIELDS: dict[str, dict[str, Any]] = {
    "messages.0.content": chat_body(f"hello {LONE}"),
    "messages.0.content.0.text": chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": LONE}]}]),
    "messages.1.content": chat_body(
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"{LONE}x"}]
    ),
    "messages.0.name": chat_body(messages=[{"role": "user", "content": "hi", "name": LONE}]),
    "stop": chat_body(stop=f"end{LONE}"),
    "stop.1": chat_body(stop=["ok", LONE]),
    "user": chat_body(user=LONE),
    "model": chat_body(model=f"tokenspool-sim{LONE}"),
}
COMPLETION_FIELDS: dict[str, dict[str, Any]] = {
    "prompt": {"model": MODEL, "prompt": f"once upon {LONE}", "max_tokens": 3, "stream": True},
    "prompt.0": {"model": MODEL, "prompt": [LONE], "max_tokens": 3, "stream": True},
}


@pytest.fixture(scope="module")
def gateway(cluster: Cluster) -> Iterator[tuple[Gateway, str]]:
    """A gateway with per-key limits (one open stream, a per-minute count) and a gRPC port; a sim worker."""
    cluster.worker(sim_itl_ms=5, sim_ttft_ms=5)
    grpc_port = free_port()
    gateway = cluster.gateway(
        api_keys=f"tester:{KEY}", key_max_streams=1, key_requests_per_minute=1000, grpc_port=grpc_port
    )
    wait_for_model(gateway, MODEL, headers=AUTH)
    wait_for(lambda: not open_stream_places(cluster), 10, "no open-stream place held")
    yield gateway, f"127.0.0.1:{grpc_port}"


def snapshot(cluster: Cluster) -> set[bytes]:
    """Every key but the registry's: requests, queue entries, per-key counters and open-stream places."""
    return {k for k in cluster.redis.keys(f"{keys.PREFIX}:*") if b"{reg}" not in k}  # type: ignore[union-attr]


def assert_names_the_field(error: dict[str, Any], field: str) -> None:
    assert error["code"] == "invalid_text" and error["param"] == field, error
    assert f"'{field}'" in error["message"] and "surrogate" in error["message"], error


@pytest.mark.parametrize(
    ("path", "field"),
    [("/v1/chat/completions", f) for f in CHAT_FIELDS] + [("/v1/completions", f) for f in COMPLETION_FIELDS],
)
def test_a_lone_surrogate_over_http_is_a_400_naming_the_field_and_holds_nothing(
    cluster: Cluster, gateway: tuple[Gateway, str], path: str, field: str
) -> None:
    gw, _ = gateway
    body = {**CHAT_FIELDS, **COMPLETION_FIELDS}[field]
    before = snapshot(cluster)
    for _ in range(2):  # twice in a row: the second finds nothing held by the first
        response = httpx.post(
            gw.url + path, content=raw_json(body), headers={**AUTH, "Content-Type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert_names_the_field(response.json()["error"], field)
    assert snapshot(cluster) == before, "a refused request left something in Redis"
    # The key's one open-stream place is free: a good stream starts at once.
    good = read_stream("POST", gw.url + "/v1/chat/completions", json=chat_body("fine", max_tokens=2), headers=AUTH)
    assert good.events[-1].data == "[DONE]"
    wait_for(lambda: not open_stream_places(cluster), 10, "the good stream's place to be given back")


def open_stream_places(cluster: Cluster) -> list[bytes]:
    return list(cluster.redis.keys("ts:streams:*"))  # type: ignore[arg-type]


def test_a_surrogate_in_a_parameter_name_is_a_400_not_a_500(cluster: Cluster, gateway: tuple[Gateway, str]) -> None:
    gw, _ = gateway
    body = {**chat_body("hi"), f"x{LONE}": 1}
    response = httpx.post(
        gw.url + "/v1/chat/completions", content=raw_json(body), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_text", response.text


def test_a_lone_surrogate_over_websocket_is_an_error_naming_the_field(
    cluster: Cluster, gateway: tuple[Gateway, str]
) -> None:
    gw, _ = gateway
    url = gw.url.replace("http://", "ws://", 1) + "/v1/ws"
    messages = {
        "prompt": {"prompt": f"a{LONE}"},
        "messages.0.content": {"messages": [{"role": "user", "content": LONE}]},
        "stop": {"prompt": "a", "stop": LONE},
        "model": {"prompt": "a", "model": LONE},
        "idempotency_key": {"prompt": "a", "idempotency_key": LONE},
        "cancel": {"cancel": LONE},
        "last_event_id": {"resume": keys.new_request_id("chat"), "last_event_id": LONE},
    }
    before = snapshot(cluster)
    with connect(url, open_timeout=10, additional_headers=AUTH) as ws:
        for number, (field, message) in enumerate(messages.items()):
            ws.send(raw_json({**message, "id": number}).decode())
            answer = orjson.loads(ws.recv(timeout=15))
            assert answer["type"] == "error" and answer["status"] == 400, answer
            assert answer["id"] == number, answer
            assert_names_the_field(answer["error"], field)
        assert snapshot(cluster) == before, "a refused message left something in Redis"
        ws.send(raw_json({"prompt": "a", "id": LONE}).decode())
        answer = orjson.loads(ws.recv(timeout=15))
        assert answer["type"] == "error" and answer["id"] is None and answer["error"]["param"] == "id", answer
        ws.send(orjson.dumps({"prompt": "still works", "max_tokens": 2, "id": "good"}).decode())
        assert orjson.loads(ws.recv(timeout=15))["type"] == "accepted"
        while orjson.loads(ws.recv(timeout=15))["type"] != "done":
            pass
    wait_for(lambda: not open_stream_places(cluster), 10, "the good stream's place to be given back")


def test_text_that_is_not_utf8_over_grpc_is_invalid_argument(cluster: Cluster, gateway: tuple[Gateway, str]) -> None:
    """Protobuf strings are UTF-8 on the wire, so a lone surrogate arrives as its (invalid) three-byte form:
    the call is refused with INVALID_ARGUMENT, not an internal error, and stores nothing."""
    _, target = gateway
    marker = "MARKER"
    request = pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="user", content=marker)], max_tokens=2)
    data = request.SerializeToString().replace(marker.encode(), b"\xed\xa0\x80abc")
    before = snapshot(cluster)
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_stream(
            "/ChatService/StreamChat",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ChatResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(call(data, metadata=[("authorization", f"Bearer {KEY}")], timeout=15))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert snapshot(cluster) == before
