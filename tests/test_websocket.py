"""The WebSocket transport (/v1/ws) against real gateways and a real worker: streams match the stored
replay, several share one socket, a lost socket (or a killed gateway) is resumed elsewhere exactly, cancel
stops a request, and bad messages get in-protocol errors that change nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.support import Cluster, Gateway, Worker, chat_body, content_of, read_stream, wait_for, wait_for_model
from tokenspool.shared import keys

Stack = tuple[list[Gateway], list[Worker]]
Message = dict[str, Any]

RECV_TIMEOUT_S = 15.0


@pytest.fixture(scope="module")
def stack(cluster: Cluster) -> Stack:
    """One sim worker (so a message without a model has exactly one to go to) and two gateways."""
    workers = [cluster.worker(sim_itl_ms=10, sim_ttft_ms=20)]
    gateways = [cluster.gateway(), cluster.gateway()]
    return gateways, workers


def ws_url(gateway: Gateway) -> str:
    return gateway.url.replace("http://", "ws://", 1) + "/v1/ws"


@pytest.fixture
def sockets() -> Iterator[ExitStack]:
    """Sockets a test opens through :func:`open_socket`, closed when it ends."""
    with ExitStack() as opened:
        yield opened


def open_socket(sockets: ExitStack, gateway: Gateway) -> ClientConnection:
    return sockets.enter_context(connect(ws_url(gateway), open_timeout=10))


def send(ws: ClientConnection, message: Message | str) -> None:
    ws.send(message if isinstance(message, str) else orjson.dumps(message).decode())


def recv(ws: ClientConnection) -> Message:
    message: Message = orjson.loads(ws.recv(timeout=RECV_TIMEOUT_S))
    return message


def ask(ws: ClientConnection, message: Message | str) -> Message:
    """Send a message and return the next message the server sends (on a socket with no stream running)."""
    send(ws, message)
    return recv(ws)


def collect(ws: ClientConnection, request_ids: set[str], into: list[Message] | None = None) -> list[Message]:
    """Every message received until each of ``request_ids`` has had its ``done``."""
    received = into if into is not None else []
    open_ids = set(request_ids)
    while open_ids:
        message = recv(ws)
        received.append(message)
        if message["type"] == "done":
            open_ids.discard(message["request_id"])
    return received


def until_done(ws: ClientConnection, streams: int) -> list[Message]:
    """Every message received until ``streams`` streams have ended."""
    received: list[Message] = []
    while len(of_type(received, "done")) < streams:
        received.append(recv(ws))
    return received


def read_tokens(ws: ClientConnection, request_id: str, count: int) -> list[Message]:
    tokens: list[Message] = []
    while len(tokens) < count:
        message = recv(ws)
        assert message["type"] != "done", f"the stream ended after {len(tokens)} tokens"
        if message["type"] == "token" and message["request_id"] == request_id:
            tokens.append(message)
    return tokens


def submit(ws: ClientConnection, message: Message) -> str:
    accepted = ask(ws, message)
    assert accepted["type"] == "accepted", accepted
    assert accepted["id"] == message.get("id")
    request_id: str = accepted["request_id"]
    return request_id


def of(messages: list[Message], request_id: str, kind: str | None = None) -> list[Message]:
    return [m for m in messages if m["request_id"] == request_id and (kind is None or m["type"] == kind)]


def sequence_numbers(messages: list[Message], request_id: str) -> list[int]:
    out = []
    for message in messages:
        if message.get("event_id"):
            named, seq = keys.parse_event_id(message["event_id"])
            assert named == request_id
            out.append(seq)
    return out


def assert_exactly_once(messages: list[Message], request_id: str) -> None:
    """The request's events 1..N arrived once each, in order, the last one being its ``done``."""
    seqs = sequence_numbers(of(messages, request_id), request_id)
    assert seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate: {seqs}"
    assert of(messages, request_id)[-1]["type"] == "done"


def of_type(messages: list[Message], kind: str) -> list[Message]:
    return [m for m in messages if m["type"] == kind]


def text_of(messages: list[Message]) -> str:
    return "".join(m["content"] for m in messages if m["type"] == "token")


def stored_text(gateway: Gateway, request_id: str) -> str:
    return content_of(read_stream("GET", f"{gateway.url}/v1/requests/{request_id}/events").events)


def request_count(cluster: Cluster) -> int:
    return sum(1 for _ in cluster.redis.scan_iter(match="ts:*:r:*:meta", count=1000))


def test_a_prompt_streams_tokens_then_done_matching_the_stored_replay(stack: Stack, sockets: ExitStack) -> None:
    (gw_a, gw_b), _ = stack
    ws = open_socket(sockets, gw_a)
    request_id = submit(ws, {"prompt": "hello over a websocket", "max_tokens": 20, "seed": 3, "id": "first"})
    messages = collect(ws, {request_id})
    tokens, done = messages[:-1], messages[-1]
    assert {m["type"] for m in tokens} == {"token"} and len(tokens) == 20
    assert sequence_numbers(messages, request_id) == list(range(1, 22)), "tokens then the end event, no gap"
    assert done == {
        "type": "done",
        "request_id": request_id,
        "id": "first",
        "event_id": keys.event_id(request_id, 21),
        "state": "done",
        "finish_reason": "length",
        "usage": done["usage"],
    }
    assert done["usage"]["completion_tokens"] == 20
    assert text_of(tokens) == stored_text(gw_b, request_id) != ""
    replay = read_stream("GET", f"{gw_b.url}/v1/requests/{request_id}/events")
    assert [e.id for e in replay.events[:-1] if e.id]  # the role chunk has no id == [m["event_id"] for m in tokens]


def test_two_requests_interleave_on_one_socket_and_both_complete(stack: Stack, sockets: ExitStack) -> None:
    (gw_a, gw_b), _ = stack
    ws = open_socket(sockets, gw_a)
    send(ws, {"prompt": "first of two", "max_tokens": 30, "seed": 1, "id": 1})
    send(ws, {"messages": [{"role": "user", "content": "second of two"}], "max_tokens": 40, "seed": 2, "id": 2})
    messages: list[Message] = []
    accepted: dict[int, str] = {}
    while len(accepted) < 2:
        message = recv(ws)
        if message["type"] == "accepted":
            accepted[message["id"]] = message["request_id"]
        else:
            messages.append(message)
    first, second = accepted[1], accepted[2]
    collect(ws, {first, second}, into=messages)
    positions = {rid: [i for i, m in enumerate(messages) if m["request_id"] == rid] for rid in (first, second)}
    assert positions[first][0] < positions[second][-1] and positions[second][0] < positions[first][-1], (
        "the two streams were sent one after the other, not interleaved"
    )
    for request_id, count in ((first, 30), (second, 40)):
        mine = of(messages, request_id)
        assert len(of(mine, request_id, "token")) == count
        assert sequence_numbers(mine, request_id) == list(range(1, count + 2))
        assert mine[-1]["type"] == "done" and mine[-1]["state"] == "done"
        assert text_of(mine) == stored_text(gw_b, request_id)


def resume_rest(ws: ClientConnection, request_id: str, last_event_id: str) -> list[Message]:
    resumed = ask(ws, {"resume": request_id, "last_event_id": last_event_id, "id": "again"})
    assert resumed == {"type": "resumed", "request_id": request_id, "id": "again", "last_event_id": last_event_id}
    return collect(ws, {request_id})


def test_a_socket_closed_mid_stream_is_resumed_on_another_gateway_exactly(
    cluster: Cluster, stack: Stack, sockets: ExitStack
) -> None:
    (gw_a, gw_b), _ = stack
    ws = open_socket(sockets, gw_a)
    request_id = submit(ws, {"prompt": "leave early", "max_tokens": 80, "seed": 4})
    head = read_tokens(ws, request_id, 5)
    ws.close()
    tail = resume_rest(open_socket(sockets, gw_b), request_id, head[-1]["event_id"])
    assert_exactly_once(head + tail, request_id)
    assert text_of(head + tail) == stored_text(gw_a, request_id)
    assert tail[-1]["state"] == "done" and cluster.meta(request_id)["state"] == "done"


def test_a_gateway_killed_mid_stream_is_resumed_on_another_gateway_exactly(
    cluster: Cluster, stack: Stack, sockets: ExitStack
) -> None:
    (gw_a, _), _ = stack
    doomed = cluster.gateway()
    ws = open_socket(sockets, doomed)
    request_id = submit(ws, {"prompt": "outlive your gateway", "max_tokens": 80, "seed": 5})
    head = read_tokens(ws, request_id, 7)
    doomed.proc.kill()
    tail = resume_rest(open_socket(sockets, gw_a), request_id, head[-1]["event_id"])
    assert_exactly_once(head + tail, request_id)
    assert text_of(head + tail) == stored_text(gw_a, request_id)
    assert tail[-1]["state"] == "done"


def test_a_retry_with_the_same_idempotency_key_on_a_new_socket_streams_the_first_request(
    stack: Stack, sockets: ExitStack
) -> None:
    (gw_a, gw_b), _ = stack
    body = {"prompt": "exactly one request", "max_tokens": 30, "idempotency_key": uuid.uuid4().hex}
    first = open_socket(sockets, gw_a)
    request_id = submit(first, body)
    read_tokens(first, request_id, 2)
    first.close()
    again = open_socket(sockets, gw_b)
    assert submit(again, body) == request_id
    messages = collect(again, {request_id})
    assert_exactly_once(messages, request_id)
    assert text_of(messages) == stored_text(gw_a, request_id)


def test_cancel_ends_the_request_in_protocol_and_in_redis(cluster: Cluster, stack: Stack, sockets: ExitStack) -> None:
    (gw_a, _), _ = stack
    ws = open_socket(sockets, gw_a)
    request_id = submit(ws, {"prompt": "stop me", "max_tokens": 2000, "seed": 6})
    head = read_tokens(ws, request_id, 3)
    send(ws, {"cancel": request_id, "id": "stop"})
    rest = collect(ws, {request_id})
    ack = [m for m in rest if m["type"] == "cancel"]
    assert ack == [
        {"type": "cancel", "request_id": request_id, "id": "stop", "cancelled": True, "state": ack[0]["state"]}
    ]
    assert ack[0]["state"] in ("cancelled", "cancelling")
    error, done = rest[-2], rest[-1]
    assert error["type"] == "error" and error["error"]["type"] == "cancelled"
    assert done["state"] == "cancelled" and done["finish_reason"] is None
    assert_exactly_once(head + rest, request_id)
    assert len(head) + len(of(rest, request_id, "token")) < 2000
    assert cluster.meta(request_id)["state"] == "cancelled"
    assert httpx.get(f"{gw_a.url}/v1/requests/{request_id}").json()["state"] == "cancelled"
    again = ask(ws, {"cancel": request_id})
    assert again["type"] == "error" and again["status"] == 409 and again["error"]["code"] == "request_ended"


def test_bad_messages_get_errors_in_protocol_and_the_socket_stays_usable(
    cluster: Cluster, stack: Stack, sockets: ExitStack
) -> None:
    (gw_a, _), _ = stack
    ws = open_socket(sockets, gw_a)
    before = request_count(cluster)
    unknown_id = keys.new_request_id("chat")
    cases: list[tuple[Message | str, int, str, str | None]] = [
        ("this is not JSON", 400, "invalid_json", None),
        ("[1, 2]", 400, "invalid_message", None),
        ({"hello": "there"}, 400, "unknown_message", None),
        ({"prompt": "x", "tools": "all"}, 400, "invalid_value", "tools"),
        ({"prompt": "x", "n": 3}, 400, "unsupported_parameter", "n"),  # the sim engine writes one choice
        ({"prompt": "x", "temperature": "hot"}, 400, "invalid_value", "temperature"),
        ({"prompt": "x", "stream": False}, 400, "invalid_value", "stream"),
        ({"prompt": "x", "model": "no-such-model"}, 404, "model_not_found", None),
        ({"messages": []}, 400, "invalid_value", "messages"),
        ({"resume": unknown_id, "last_event_id": None}, 404, "request_not_found", None),
        ({"resume": "not-a-request"}, 404, "request_not_found", None),
        ({"resume": unknown_id, "last_event_id": "garbage"}, 400, "invalid_event_id", "last_event_id"),
        ({"cancel": unknown_id}, 404, "request_not_found", None),
        ({"cancel": unknown_id, "prompt": "x"}, 400, "unsupported_parameter", "prompt"),
    ]
    for number, (message, status, code, param) in enumerate(cases):
        if isinstance(message, dict):
            message = {**message, "id": number}
        answer = ask(ws, message)
        assert answer["type"] == "error", (message, answer)
        assert (answer["status"], answer["error"]["code"], answer["error"]["param"]) == (status, code, param), answer
        assert answer["id"] == (number if isinstance(message, dict) else None)
        if isinstance(message, dict) and ("resume" in message or "cancel" in message):
            assert answer["request_id"] == message.get("resume", message.get("cancel"))
    assert request_count(cluster) == before, "a refused message created a request"
    for params in ({"n": 3}, {"tools": "all"}):
        over_ws = ask(ws, {"prompt": "same mistake", **params})["error"]
        over_http = httpx.post(gw_a.url + "/v1/chat/completions", json=chat_body("same mistake", **params))
        assert over_http.json()["error"] == over_ws, "the same mistake gets another error over HTTP"
    request_id = submit(ws, {"prompt": "still works", "max_tokens": 5, "id": "good"})
    assert collect(ws, {request_id})[-1]["state"] == "done"


@pytest.fixture(scope="module")
def strict_gateway(cluster: Cluster, stack: Stack) -> Gateway:
    """A gateway with a short disconnect grace period and send timeout."""
    return cluster.gateway(disconnect_grace_s=1.0, attach_refresh_s=0.2, send_timeout_s=0.5)


def test_a_socket_that_leaves_for_good_lets_its_request_be_cancelled_after_the_grace_period(
    cluster: Cluster, strict_gateway: Gateway
) -> None:
    with connect(ws_url(strict_gateway), open_timeout=10) as ws:
        request_id = submit(ws, {"prompt": "abandoned", "max_tokens": 2000, "ignore_eos": True})
        read_tokens(ws, request_id, 2)
        # Submitted on this socket, the stream is attached quietly: recorded at the next renewal, as over SSE.
        attached = keys.RequestKeys.of(request_id).attached
        wait_for(lambda: cluster.redis.zcard(attached) == 1, 5, "the stream to be attached")
    wait_for(lambda: cluster.meta(request_id).get("state") == "cancelled", 15, "the abandoned request to be cancelled")
    assert "no client was attached" in cluster.meta(request_id)["error"]


def test_a_client_that_stops_reading_is_dropped(strict_gateway: Gateway, sockets: ExitStack) -> None:
    """A client that never reads backs the gateway's socket up within a few MB (uncompressed: the server
    would deflate these messages tenfold); the gateway's sends then time out and it drops the client."""
    sluggish = sockets.enter_context(
        connect(ws_url(strict_gateway), open_timeout=10, close_timeout=1, max_queue=1, compression=None)
    )
    streams = 32
    for n in range(streams):
        big = {"logprobs": True, "top_logprobs": 20}  # about 2 kB per token message: 13 MB in all
        send(sluggish, {"prompt": f"backlog {n}", "max_tokens": 200, "ignore_eos": True, **big})
    wait_for(lambda: "did not accept a message" in strict_gateway.proc.log(), 20, "the gateway to drop the client")
    received: list[Message] = []
    with pytest.raises(ConnectionClosed):
        while True:
            received.append(recv(sluggish))
    # On a loaded machine the backlog can pass the limit before the gateway has read every submission (a
    # two-copy CI run: 28 of 32 accepted): what counts is that the client was dropped mid-way.
    accepted = of_type(received, "accepted")
    assert 0 < len(accepted) <= streams
    assert len(of_type(received, "done")) < len(accepted), "the dropped client still got every stream it started"


def test_a_waiting_request_reports_its_queue_and_a_model_must_be_named_when_several_are_served(
    cluster: Cluster, stack: Stack, sockets: ExitStack
) -> None:
    (gw_a, _), _ = stack
    narrow = cluster.worker(model="ws-narrow", max_num_seqs=1, sim_itl_ms=10)
    try:
        wait_for_model(gw_a, "ws-narrow")
        ws = open_socket(sockets, gw_a)
        refused = ask(ws, {"prompt": "which model?", "id": "vague"})
        assert (refused["type"], refused["error"]["code"], refused["error"]["param"]) == (
            "error",
            "missing_parameter",
            "model",
        )
        hog = submit(ws, {"prompt": "hog", "model": "ws-narrow", "max_tokens": 2000, "ignore_eos": True})
        read_tokens(ws, hog, 1)
        send(ws, {"prompt": "patient", "model": "ws-narrow", "max_tokens": 3, "id": "patient"})
        patient = ""
        while True:
            message = recv(ws)
            if message["type"] == "accepted":
                patient = message["request_id"]
            if message["type"] == "queued" and message["request_id"] == patient:
                assert message["waiting"] >= 1
                break
        send(ws, {"cancel": hog})
        messages = collect(ws, {hog, patient})
        assert of(messages, patient)[-1]["state"] == "done"
        assert_exactly_once(messages, patient)
    finally:
        narrow.proc.stop()


def test_token_messages_carry_choice_reasoning_and_tool_calls_only_when_set() -> None:
    from tokenspool.gateway.transports import ws_protocol
    from tokenspool.shared import wire

    calls = '[{"index":0,"function":{"arguments":"{\\"ci"}}]'
    rich = ws_protocol.token("chatcmpl-x", 4, wire.Event("delta", "", (9,), index=1, reasoning="hm", tool_calls=calls))
    decoded = orjson.loads(ws_protocol.encode(rich))
    assert (decoded["index"], decoded["reasoning"]) == (1, "hm")
    assert decoded["tool_calls"] == [{"index": 0, "function": {"arguments": '{"ci'}}]
    plain = ws_protocol.token("chatcmpl-x", 5, wire.Event("delta", "word", (3,)))
    assert set(plain) == {"type", "request_id", "event_id", "content"}
