"""The gateway speaks OpenAI: the official SDK works against it unchanged, streaming and not."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support import Gateway, Worker, chat_body, content_of, read_stream

Stack = tuple[list[Gateway], list[Worker]]


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack[0][0].url + "/v1", api_key="unused", max_retries=0)


def test_sdk_streams_a_chat_completion_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tokenspool-sim",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=12,
        seed=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    ids = {chunk.id for chunk in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 12
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 12


def test_sdk_non_streaming_chat_returns_the_same_text_as_streaming(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="tokenspool-sim", messages=[{"role": "user", "content": "Same seed"}], max_tokens=10, seed=11
    )
    streamed = client.chat.completions.create(
        model="tokenspool-sim",
        messages=[{"role": "user", "content": "Same seed"}],
        max_tokens=10,
        seed=11,
        stream=True,
    )
    streamed_text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == streamed_text
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 10


def test_sdk_completions_stream_and_not(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tokenspool-sim", prompt="Once", max_tokens=8, seed=5)
    chunks = list(client.completions.create(model="tokenspool-sim", prompt="Once", max_tokens=8, seed=5, stream=True))
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert len(full.choices[0].text.split()) == 8


def test_stop_string_ends_the_reply_with_stop(client: openai.OpenAI) -> None:
    probe = client.completions.create(model="tokenspool-sim", prompt="stopper", max_tokens=12, seed=1)
    words = probe.choices[0].text.split()
    stop_word = words[4]
    stopped = client.completions.create(
        model="tokenspool-sim", prompt="stopper", max_tokens=12, seed=1, stop=[" " + stop_word]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop_word not in stopped.choices[0].text.split()[words.index(stop_word) :]
    assert probe.choices[0].text.startswith(stopped.choices[0].text)


def test_stream_headers_and_event_ids(stack: Stack) -> None:
    stream = read_stream("POST", stack[0][0].url + "/v1/chat/completions", json=chat_body(max_tokens=5))
    assert stream.headers is not None
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    request_id = stream.headers["x-request-id"]
    assert stream.events[-1].data == "[DONE]"
    [role] = stream.opening
    assert role.id is None and role.json()["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    data_events = stream.events[:-1]
    assert [e.id for e in data_events] == [f"{request_id}:{n}" for n in range(1, 6)]
    assert all(e.json()["id"] == request_id for e in [role, *data_events])


def test_models_lists_what_live_workers_serve(stack: Stack) -> None:
    body = httpx.get(stack[0][0].url + "/v1/models").json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == "tokenspool-sim" and "simulated" in model["owned_by"]


def test_health_and_readiness(stack: Stack) -> None:
    assert httpx.get(stack[0][0].url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(stack[0][1].url + "/readyz").status_code == 200


def test_same_prompt_and_seed_give_the_same_reply(stack: Stack) -> None:
    first = read_stream("POST", stack[0][0].url + "/v1/chat/completions", json=chat_body("determinism", seed=42))
    second = read_stream("POST", stack[0][1].url + "/v1/chat/completions", json=chat_body("determinism", seed=42))
    other = read_stream("POST", stack[0][1].url + "/v1/chat/completions", json=chat_body("determinism", seed=43))
    assert content_of(first.events) == content_of(second.events)
    assert content_of(first.events) != content_of(other.events)


def test_sdk_receives_logprobs_streamed_and_not(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tokenspool-sim",
        messages=[{"role": "user", "content": "odds"}],
        max_tokens=5,
        seed=2,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content if reply.choices[0].logprobs else None
    assert content is not None and len(content) == 5
    assert "".join(c.token for c in content) == reply.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.logprob < 0 for c in content)
    chunks = list(
        client.chat.completions.create(
            model="tokenspool-sim",
            messages=[{"role": "user", "content": "odds"}],
            max_tokens=5,
            seed=2,
            logprobs=True,
            top_logprobs=2,
            stream=True,
        )
    )
    streamed = [
        c
        for chunk in chunks
        if chunk.choices and chunk.choices[0].logprobs
        for c in chunk.choices[0].logprobs.content or []
    ]
    assert [c.token for c in streamed] == [c.token for c in content]
    plain = client.chat.completions.create(
        model="tokenspool-sim", messages=[{"role": "user", "content": "odds"}], max_tokens=5, seed=2
    )
    assert plain.choices[0].logprobs is None


def test_sdk_default_no_op_fields_are_accepted_as_vllm_serve_accepts_them(client: openai.OpenAI) -> None:
    """What SDKs send by default (LangChain, LiteLLM, the Vercel AI SDK) changes nothing: vLLM's server
    accepts it, and so does tokenspool, even on the simulated engine."""
    plain = client.chat.completions.create(
        model="tokenspool-sim", messages=[{"role": "user", "content": "same reply"}], max_tokens=5, seed=3
    )
    with_defaults = client.chat.completions.create(
        model="tokenspool-sim",
        messages=[{"role": "user", "content": "same reply"}],
        max_tokens=5,
        seed=3,
        response_format={"type": "text"},
        metadata={"trace": "abc"},
        store=False,
        service_tier="auto",
        user="someone",
        parallel_tool_calls=True,
        extra_body={"tools": None, "tool_choice": None, "prompt_cache_key": "k", "some_future_field": 1},
    )
    assert with_defaults.choices[0].message.content == plain.choices[0].message.content
    history = client.chat.completions.create(
        model="tokenspool-sim",
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
        max_tokens=3,
    )
    assert history.choices[0].message.content
