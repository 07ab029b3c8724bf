"""Limits, against real gateways and a real worker: per API key (requests per minute, open streams across
gateways, max_tokens), per request (body, prompt, messages, stop strings) and per gateway (connections);
each trips at the right count with its status, code and Retry-After, and a refused request leaves no trace
in Redis. CORS is closed unless origins are configured."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import orjson
import pytest
from websockets.sync.client import connect

from tests.support import Cluster, Gateway, chat_body, iter_sse, wait_for
from tokenspool.shared import keys

KEY_A = "sk-limits-a-" + secrets.token_hex(12)
KEY_B = "sk-limits-b-" + secrets.token_hex(12)
MODEL = "tokenspool-sim"
KEYS = f"a:{KEY_A},b:{KEY_B}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def stored(cluster: Cluster) -> tuple[int, int]:
    """(request metadata hashes, queue entries): what a refused request must not change."""
    metas = sum(1 for _ in cluster.redis.scan_iter(f"{keys.PREFIX}:{{p*}}:r:*:meta"))
    return metas, int(cluster.redis.xlen(keys.queue_key(MODEL)))  # type: ignore[arg-type]


def nothing_stored_since(cluster: Cluster, before: tuple[int, int]) -> bool:
    """No request record was added and the queue did not grow (a worker removes the entries of requests that
    ended in the background, so the queue may shrink meanwhile; it must not grow)."""
    metas, queued = stored(cluster)
    return metas == before[0] and queued <= before[1]


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


@pytest.fixture(scope="module", autouse=True)
def worker(cluster: Cluster) -> None:
    cluster.worker(sim_itl_ms=20, sim_ttft_ms=10, max_num_seqs=64)


@pytest.fixture
def streams() -> Iterator[ExitStack]:
    with ExitStack() as opened:
        yield opened


def open_stream(streams: ExitStack, url: str, key: str) -> httpx.Response:
    """A long SSE stream held open (until the test ends); the response, its first event read."""
    client = streams.enter_context(httpx.Client(timeout=30))
    body = chat_body(max_tokens=3000, background=False)
    response = streams.enter_context(
        client.stream("POST", url + "/v1/chat/completions", json=body, headers=bearer(key))
    )
    assert response.status_code == 200, response.read()
    items = iter_sse(response)
    next(item for item in items if not isinstance(item, str))
    streams.callback(items.close)  # held: a dropped iterator would close the response with it
    return response


# -- per key ---------------------------------------------------------------------------------------------


def test_requests_per_minute_trip_at_the_limit_per_key_with_retry_after_and_store_nothing(cluster: Cluster) -> None:
    gateway = cluster.gateway(api_keys=KEYS, key_requests_per_minute=3)
    # all four submissions must fall in one one-minute window
    wait_for(lambda: time.time() % 60 < 45, 20, "the start of a minute window")
    url = gateway.url + "/v1/chat/completions"
    body = chat_body(max_tokens=2, stream=False)
    for _ in range(3):
        assert httpx.post(url, json=body, headers=bearer(KEY_A), timeout=30).status_code == 200
    before = stored(cluster)
    refused = httpx.post(url, json=body, headers=bearer(KEY_A), timeout=30)
    error_of(refused, 429, "rate_limit_exceeded")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert nothing_stored_since(cluster, before), (stored(cluster), before)
    # another key has its own window
    assert httpx.post(url, json=body, headers=bearer(KEY_B), timeout=30).status_code == 200


def test_open_streams_per_key_are_counted_across_gateways_and_freed_when_a_stream_closes(
    cluster: Cluster, streams: ExitStack
) -> None:
    a = cluster.gateway(api_keys=KEYS, key_max_streams=2, attach_refresh_s=0.5)
    b = cluster.gateway(api_keys=KEYS, key_max_streams=2, attach_refresh_s=0.5)
    first = open_stream(streams, a.url, KEY_A)
    open_stream(streams, b.url, KEY_A)
    before = stored(cluster)
    for gateway in (a, b):
        refused = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(), headers=bearer(KEY_A))
        error_of(refused, 429, "too_many_streams")
        assert refused.headers["retry-after"] == "1"
    assert nothing_stored_since(cluster, before), ("a refused stream stored a request", stored(cluster), before)
    # a resume is a stream too, and so is a WebSocket relay
    request_id = first.headers["x-request-id"]
    error_of(httpx.get(f"{a.url}/v1/requests/{request_id}/events", headers=bearer(KEY_A)), 429, "too_many_streams")
    with connect(a.url.replace("http", "ws") + "/v1/ws", additional_headers=bearer(KEY_A), open_timeout=10) as ws:
        ws.send(orjson.dumps({"resume": request_id, "last_event_id": None}).decode())
        answer = orjson.loads(ws.recv(timeout=10))
        assert answer["type"] == "error" and answer["error"]["code"] == "too_many_streams"
    # another key is not affected
    assert httpx.post(a.url + "/v1/chat/completions", json=chat_body(max_tokens=2), headers=bearer(KEY_B)).is_success
    # closing a stream gives its place back
    first.close()

    def resumable() -> bool:
        response = httpx.get(f"{b.url}/v1/requests/{request_id}", headers=bearer(KEY_A))
        assert response.status_code == 200
        with (
            httpx.Client(timeout=10) as client,
            client.stream("GET", f"{b.url}/v1/requests/{request_id}/events", headers=bearer(KEY_A)) as resumed,
        ):
            return resumed.status_code == 200

    wait_for(resumable, 10, "the closed stream's place to be given back")


def test_a_dead_gateways_streams_free_their_places_when_their_leases_run_out(
    cluster: Cluster, streams: ExitStack
) -> None:
    doomed = cluster.gateway(api_keys=KEYS, key_max_streams=1, attach_refresh_s=0.3)
    other = cluster.gateway(api_keys=KEYS, key_max_streams=1, attach_refresh_s=0.3)
    open_stream(streams, doomed.url, KEY_B)
    error_of(
        httpx.post(other.url + "/v1/chat/completions", json=chat_body(), headers=bearer(KEY_B)), 429, "too_many_streams"
    )
    doomed.proc.kill()
    wait_for(
        lambda: (
            httpx.post(
                other.url + "/v1/chat/completions", json=chat_body(max_tokens=2, stream=False), headers=bearer(KEY_B)
            ).status_code
            == 200
        ),
        15,
        "the dead gateway's lease to run out",
    )


def test_max_tokens_above_the_key_cap_is_400_and_a_request_without_one_gets_the_cap(cluster: Cluster) -> None:
    gateway = cluster.gateway(api_keys=KEYS, key_max_tokens=5)
    url = gateway.url + "/v1/chat/completions"
    before = stored(cluster)
    uncapped = chat_body(stream=False)
    uncapped.pop("max_tokens")
    for body in (chat_body(stream=False, max_tokens=6), {**uncapped, "max_completion_tokens": 6}):
        error_of(httpx.post(url, json=body, headers=bearer(KEY_A)), 400, "max_tokens_above_limit")
    assert nothing_stored_since(cluster, before), (stored(cluster), before)
    assert httpx.post(url, json=chat_body(stream=False, max_tokens=5), headers=bearer(KEY_A)).status_code == 200
    capped = httpx.post(url, json=uncapped, headers=bearer(KEY_A), timeout=30).json()
    assert capped["usage"]["completion_tokens"] == 5 and capped["choices"][0]["finish_reason"] == "length"


# -- per request -------------------------------------------------------------------------------------------


def test_oversized_inputs_are_refused_before_anything_is_stored(cluster: Cluster) -> None:
    gateway = cluster.gateway(max_prompt_chars=100, max_messages=3, max_body_bytes=4096)
    chat = gateway.url + "/v1/chat/completions"
    user = {"role": "user", "content": "x"}
    cases: list[tuple[str, dict[str, Any] | bytes, int, str]] = [
        (chat, chat_body("x" * 101), 400, "prompt_too_long"),
        (chat, chat_body(messages=[{"role": "user", "content": "x" * 60}] * 2), 400, "prompt_too_long"),
        (chat, chat_body(messages=[user] * 4), 400, "too_many_messages"),
        (chat, chat_body(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
        (chat, chat_body(stop=["s" * 257]), 400, "invalid_value"),
        (gateway.url + "/v1/completions", {"model": MODEL, "prompt": "y" * 101}, 400, "prompt_too_long"),
        (chat, orjson.dumps(chat_body("z" * 5000)), 413, "body_too_large"),
    ]
    before = stored(cluster)
    for url, body, status, code in cases:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        response = httpx.post(url, content=content, headers={"Content-Type": "application/json"})
        error_of(response, status, code)
    prompt_query = gateway.url + "/v1/chat/completions/stream?prompt=" + "q" * 101
    error_of(httpx.get(prompt_query), 400, "prompt_too_long")
    with connect(gateway.url.replace("http", "ws") + "/v1/ws", open_timeout=10) as ws:
        ws.send(orjson.dumps({"prompt": "w" * 101, "model": MODEL}).decode())
        answer = orjson.loads(ws.recv(timeout=10))
        assert answer["type"] == "error" and answer["error"]["code"] == "prompt_too_long"
    assert nothing_stored_since(cluster, before), (stored(cluster), before)
    at_the_limits = chat_body(max_tokens=2, stream=False)
    at_the_limits["messages"] = [{"role": "user", "content": "x" * 33}] * 3
    ok = httpx.post(chat, json=at_the_limits, timeout=30)
    assert ok.status_code == 200, ok.text


# -- per gateway -------------------------------------------------------------------------------------------


def test_connections_per_gateway_trip_at_the_limit_with_503_and_spare_health_probes(
    cluster: Cluster, streams: ExitStack
) -> None:
    gateway: Gateway = cluster.gateway(max_connections=2)
    open_stream(streams, gateway.url, "unused")
    second = open_stream(streams, gateway.url, "unused")
    refused = httpx.get(gateway.url + "/v1/models")
    error_of(refused, 503, "too_many_connections")
    assert refused.headers["retry-after"] == "1"
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(gateway.url + probe).status_code == 200
    second.close()
    wait_for(lambda: httpx.get(gateway.url + "/v1/models").status_code == 200, 10, "a connection to be free")


# -- CORS --------------------------------------------------------------------------------------------------


def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(
        url + "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_cors_is_closed_by_default_and_open_only_to_configured_origins(cluster: Cluster) -> None:
    closed = cluster.gateway()
    for response in (
        preflight(closed.url, "https://evil.example"),
        httpx.get(closed.url + "/v1/models", headers={"Origin": "https://evil.example"}),
    ):
        assert "access-control-allow-origin" not in response.headers
    opened = cluster.gateway(api_keys=KEYS, cors_origins="https://app.example.com")
    allowed = preflight(opened.url, "https://app.example.com")
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in preflight(opened.url, "https://evil.example").headers
    # answers carry the header too, refusals included, and expose the request id
    refused = httpx.get(opened.url + "/v1/models", headers={"Origin": "https://app.example.com"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "x-request-id" in refused.headers["access-control-expose-headers"].lower()
