"""Bad input gets a clear OpenAI error with the right status, and changes nothing in Redis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import Cluster, Gateway, Worker, chat_body, wait_for, wait_for_model
from tokenspool.redis_server import EmbeddedRedis
from tokenspool.shared import keys

Stack = tuple[list[Gateway], list[Worker]]


def redis_snapshot(cluster: Cluster) -> tuple[set[bytes], int]:
    request_keys = {k for k in cluster.redis.keys(f"{keys.PREFIX}:*") if b"{reg}" not in k}  # type: ignore[union-attr]
    return request_keys, int(cluster.redis.xlen(keys.queue_key("tokenspool-sim")))  # type: ignore[arg-type]


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return dict(error)


BAD_CHAT_BODIES: dict[str, tuple[bytes | dict[str, Any], str]] = {
    "malformed json": (b'{"model": "tokenspool-sim", "messages": [', "not valid JSON"),
    "not an object": (b"[1, 2]", "must be a JSON object"),
    "empty body": (b"", "required"),
    "missing messages": ({"model": "tokenspool-sim"}, "messages"),
    "missing model": ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    "messages is a string": (chat_body(messages="hello"), "messages"),
    "max_tokens is a string": (chat_body(max_tokens="10"), "max_tokens"),  # type: ignore[arg-type]
    "temperature out of range": (chat_body(temperature=5), "temperature"),
    "n > 1 on the sim engine": (chat_body(n=2), "'n' is not supported by the sim engine"),
    "tools on the sim engine": (
        chat_body(tools=[{"type": "function", "function": {"name": "f"}}]),
        "'tools' is not supported by the sim engine",
    ),
    "json_object on the sim engine": (
        chat_body(response_format={"type": "json_object"}),
        "'response_format' is not supported by the sim engine",
    ),
    "logit_bias on the sim engine": (chat_body(logit_bias={"5": 1.0}), "'logit_bias' is not supported by the sim"),
    "tools is not a list": (chat_body(tools={"name": "f"}), "tools"),
    "unknown tool_choice": (chat_body(tool_choice="sometimes"), "tool_choice"),
    "unknown response_format type": (chat_body(response_format={"type": "yaml"}), "response_format"),
    "top_logprobs without logprobs": (chat_body(top_logprobs=2), "top_logprobs requires logprobs"),
    "repetition_penalty zero": (chat_body(repetition_penalty=0), "repetition_penalty"),
    "stream_options without stream": (
        chat_body(stream=False, stream_options={"include_usage": True}),
        "only allowed when stream is true",
    ),
    "unknown role": (chat_body(messages=[{"role": "robot", "content": "beep"}]), "role"),
    "empty messages": (chat_body(messages=[]), "messages"),
    "too many stop sequences": (chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    "an integer beyond 64 bits in a field it passes on": (
        chat_body(metadata={"n": 2**70}),
        "invalid value for 'metadata.n': an integer must fit in 64 bits",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CHAT_BODIES))
def test_bad_chat_request_is_400_and_enqueues_nothing(cluster: Cluster, stack: Stack, case: str) -> None:
    body, expected = BAD_CHAT_BODIES[case]
    before = redis_snapshot(cluster)
    url = stack[0][0].url + "/v1/chat/completions"
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
    else:
        response = httpx.post(url, json=body)
    error = assert_openai_error(response, 400)
    assert expected in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert redis_snapshot(cluster) == before


@pytest.mark.parametrize(
    ("fields", "feature"),
    [
        ({"prompt": ["a", "b"]}, "prompt_list"),
        ({"prompt": [[1, 2], [3]]}, "prompt_list"),
        ({"prompt": [1, 2]}, "prompt_token_ids"),
        ({"prompt": "a", "echo": True}, "echo"),
        ({"prompt": "a", "echo": True, "max_tokens": 0}, "echo"),
    ],
    ids=["list of strings", "list of token-id lists", "token ids", "echo", "echo without tokens"],
)
def test_completion_prompt_lists_and_echo_are_refused_by_the_sim_engine_by_name(
    cluster: Cluster, stack: Stack, fields: dict[str, Any], feature: str
) -> None:
    """vLLM workers take them (tests/test_vllm_openai_parity.py); the sim engine cannot, and says so."""
    before = redis_snapshot(cluster)
    body = {"model": "tokenspool-sim", "max_tokens": 3, **fields}
    error = assert_openai_error(httpx.post(stack[0][0].url + "/v1/completions", json=body), 400)
    assert error["message"].startswith(f"'{feature}' is not supported by the sim engine"), error
    assert redis_snapshot(cluster) == before


def test_completion_max_tokens_zero_needs_echo(cluster: Cluster, stack: Stack) -> None:
    before = redis_snapshot(cluster)
    body = {"model": "tokenspool-sim", "prompt": "a", "max_tokens": 0}
    error = assert_openai_error(httpx.post(stack[0][0].url + "/v1/completions", json=body), 400)
    assert error["param"] == "max_tokens" and "0 is for echo" in error["message"], error
    assert redis_snapshot(cluster) == before


@pytest.mark.parametrize(
    "fields", [{"max_tokens": 0}, {"max_completion_tokens": 0}, {"max_tokens": 0, "stream": False}], ids=str
)
def test_chat_for_no_tokens_is_refused_as_vllm_serve_refuses_it(
    cluster: Cluster, stack: Stack, fields: dict[str, Any]
) -> None:
    before = redis_snapshot(cluster)
    response = httpx.post(stack[0][0].url + "/v1/chat/completions", json=chat_body(**fields))
    error = assert_openai_error(response, 400)
    assert error == {
        "message": "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        "type": "BadRequestError",
        "param": "max_tokens",
        "code": 400,
    }
    assert redis_snapshot(cluster) == before


def test_unknown_model_is_404_and_enqueues_nothing(cluster: Cluster, stack: Stack) -> None:
    before = redis_snapshot(cluster)
    response = httpx.post(stack[0][0].url + "/v1/chat/completions", json=chat_body(model="gpt-nope"))
    error = assert_openai_error(response, 404)
    assert error["code"] == "model_not_found" and "tokenspool-sim" in error["message"]
    assert redis_snapshot(cluster) == before
    assert cluster.redis.exists(keys.queue_key("gpt-nope")) == 0


def test_oversized_body_is_413_before_parsing(cluster: Cluster, stack: Stack) -> None:
    before = redis_snapshot(cluster)
    huge = chat_body("x" * 2_000_000)
    response = httpx.post(stack[0][0].url + "/v1/chat/completions", json=huge)
    assert assert_openai_error(response, 413)["code"] == "body_too_large"

    def chunked() -> Iterator[bytes]:
        yield b'{"model": "tokenspool-sim", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 50_000
        yield b'"}]}'

    response = httpx.post(
        stack[0][0].url + "/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"}
    )
    assert_openai_error(response, 413)
    assert redis_snapshot(cluster) == before


def test_full_queue_is_429_with_retry_after(cluster: Cluster) -> None:
    cluster.worker(model="narrow", max_num_seqs=1, sim_itl_ms=20)
    gateway = cluster.gateway(max_queue_depth=2)
    url = gateway.url + "/v1/chat/completions"
    with httpx.Client(timeout=30) as client:
        wait_for_model(gateway, "narrow")
        ids: list[str] = []
        with client.stream("POST", url, json=chat_body(model="narrow", max_tokens=400)) as first:
            ids.append(first.headers["x-request-id"])
            wait_for(lambda: cluster.meta(ids[0]).get("state") == "running", 10, "the first request to run")
            with (
                client.stream("POST", url, json=chat_body(model="narrow", max_tokens=5)) as second,
                client.stream("POST", url, json=chat_body(model="narrow", max_tokens=5)) as third,
            ):
                ids += [second.headers["x-request-id"], third.headers["x-request-id"]]
                before = int(cluster.redis.xlen(keys.queue_key("narrow")))  # type: ignore[arg-type]
                refused = client.post(url, json=chat_body(model="narrow", max_tokens=5))
                error = assert_openai_error(refused, 429)
                assert error["code"] == "queue_full" and refused.headers["retry-after"] == "1"
                assert int(cluster.redis.xlen(keys.queue_key("narrow"))) == before  # type: ignore[arg-type]
                for item in second.iter_lines():
                    if item.startswith(": queued"):
                        assert "waiting for model narrow" in item
                        break
                    assert not item.startswith("data:"), "the second request should still be queued"
                for request_id in ids:
                    client.delete(f"{gateway.url}/v1/requests/{request_id}")


def test_unreachable_redis_is_503_and_not_ready(tmp_path: Any) -> None:
    server = EmbeddedRedis().start()
    cluster = Cluster(server.url, tmp_path)
    try:
        gateway = cluster.gateway()
        server.stop()
        response = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(), timeout=30)
        error = assert_openai_error(response, 503)
        assert error["code"] == "redis_unavailable" and response.headers["retry-after"] == "1"
        assert httpx.get(gateway.url + "/readyz", timeout=30).status_code == 503
        assert httpx.get(gateway.url + "/healthz").status_code == 200
    finally:
        cluster.close()
        server.stop()


def test_a_nearly_empty_queue_is_not_read_on_every_submission(cluster: Cluster) -> None:
    """Far from max_queue_depth, a reading of the queue's depth is reused (here for a minute), so a request's
    path to its first token saves that round trip; near the limit every submission reads it (the test
    above: exactly max_queue_depth requests wait). Only the gateway's reads may count: the worker, which
    reads the same queue's depth for its gauge once per heartbeat, gets a heartbeat longer than the test, and
    the workers earlier tests of this file started (whose gauges read their own queues') are stopped first:
    the count is server-wide. (The file's last test, so nothing after it needs them.)"""
    for proc in cluster.procs:
        if proc.argv[0] == "worker" and proc.alive():
            proc.stop()
    cluster.worker(
        model="roomy", sim_itl_ms=0, sim_ttft_ms=0, worker_heartbeat_s=60, worker_ttl_s=300, lease_timeout_s=300
    )
    gateway = cluster.gateway(queue_depth_fresh_ms=60_000, max_queue_depth=100)
    with httpx.Client(timeout=30) as client:
        wait_for_model(gateway, "roomy")

        def depth_reads() -> int:
            stats: Any = cluster.redis.info("commandstats")
            return int(stats.get("cmdstat_xlen", {}).get("calls", 0))

        before = depth_reads()
        for _ in range(20):
            response = client.post(gateway.url + "/v1/chat/completions", json=chat_body(model="roomy", max_tokens=2))
            assert response.status_code == 200, response.text
        assert depth_reads() - before <= 1
