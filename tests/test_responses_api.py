"""The OpenAI Responses API, durable: the official SDK creates, streams, polls, resumes (on another gateway,
after a gateway or a worker died), cancels, deletes and chains responses; another key's response is a 404."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import ResponseStreamEvent

from tests.support import Cluster, Gateway, Worker, wait_for, wait_for_model
from tokenspool.shared import keys, wire

NODE_DIR = Path(__file__).parent / "node"
MODEL = "responses-sim"
LONG_MODEL = "responses-sim-long"
"""A model whose replies run for a minute unless stopped (for cancels)."""
ALICE = "sk-alice-responses"
BOB = "sk-bob-responses"
WORKER = {"model": MODEL, "lease_timeout_s": 1.0, "worker_heartbeat_s": 0.2, "sim_default_max_tokens": 40}
SLOW = {**WORKER, "sim_itl_ms": 25, "sim_ttft_ms": 5}
"""Replies of 20 to 40 words, slow enough that a test reads part of one and acts (kills) before it ends."""


class Stack:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.clients: dict[tuple[str, str], openai.OpenAI] = {}
        self.workers: list[Worker] = [cluster.worker(**SLOW), cluster.worker(**SLOW)]
        cluster.worker(**{**SLOW, "model": LONG_MODEL, "sim_default_max_tokens": 5000})
        self.gateways: list[Gateway] = [self.gateway(), self.gateway()]
        for model in (MODEL, LONG_MODEL):
            wait_for_model(self.gateways[0], model, headers={"Authorization": f"Bearer {ALICE}"})

    def gateway(self, **extra: Any) -> Gateway:
        return self.cluster.gateway(api_keys=f"alice:{ALICE},bob:{BOB}", **extra)

    def client(self, gateway: Gateway | None = None, key: str = ALICE) -> openai.OpenAI:
        url = (gateway or self.gateways[0]).url + "/v1"
        if (url, key) not in self.clients:
            self.clients[url, key] = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)
        return self.clients[url, key]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def job(self, response_id: str) -> wire.Job:
        raw = self.cluster.redis.get(keys.RequestKeys.of(response_id).job)
        assert raw is not None
        return wire.decode(raw, wire.Job)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def stack(cluster: Cluster) -> Iterator[Stack]:
    stack = Stack(cluster)
    yield stack
    stack.close()


def types_of(events: list[ResponseStreamEvent]) -> list[str]:
    return [event.type for event in events]


def deltas(events: list[ResponseStreamEvent]) -> str:
    return "".join(event.delta for event in events if event.type == "response.output_text.delta")


def assert_text_stream(events: list[ResponseStreamEvent], first: int = 0) -> None:
    """Contiguous numbers from ``first``; the order of a one-message response as OpenAI streams it."""
    assert [event.sequence_number for event in events] == list(range(first, first + len(events)))
    if first == 0:
        kinds = types_of(events)
        assert kinds[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        middle = set(kinds[4:-4])
        assert middle == {"response.output_text.delta"}, middle
        assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def test_sdk_streams_a_response_with_contiguous_sequence_numbers(stack: Stack) -> None:
    client = stack.client()
    events = list(client.responses.create(model=MODEL, input="Hello there", stream=True, extra_body={"seed": 3}))
    assert_text_stream(events)
    assert events[0].type == "response.created" and events[0].response.status == "in_progress"
    created_id = events[0].response.id
    assert created_id.startswith("resp_")
    completed = events[-1]
    assert completed.type == "response.completed"
    response = completed.response
    assert response.id == created_id and response.status == "completed"
    text = deltas(events)
    words = len(text.split())
    assert 20 <= words <= 40  # the sim's natural length, ended by "stop": completed
    assert response.output_text == text
    assert events[-4].type == "response.output_text.done" and events[-4].text == text
    assert response.usage is not None and response.usage.output_tokens == words
    assert response.usage.total_tokens == response.usage.input_tokens + words
    # The object any gateway answers later is the one the stream ended with.
    assert stack.client(stack.gateways[1]).responses.retrieve(created_id) == response


def test_sdk_non_streaming_response_and_max_output_tokens(stack: Stack) -> None:
    client = stack.client()
    full = client.responses.create(model=MODEL, input="Same seed", extra_body={"seed": 11})
    streamed = list(client.responses.create(model=MODEL, input="Same seed", stream=True, extra_body={"seed": 11}))
    assert full.object == "response" and full.status == "completed"
    assert full.output_text == deltas(streamed)
    assert full.output[0].type == "message" and full.output[0].role == "assistant"
    short = client.responses.create(
        model=MODEL, input="Same seed", max_output_tokens=5, instructions="Be brief", extra_body={"seed": 11}
    )
    assert short.status == "incomplete" and short.incomplete_details is not None
    assert short.incomplete_details.reason == "max_output_tokens"
    assert len(short.output_text.split()) == 5
    assert short.instructions == "Be brief" and short.max_output_tokens == 5
    assert stack.job(short.id).body and json.loads(stack.job(short.id).body)["messages"][0] == {
        "role": "system",
        "content": "Be brief",
    }


def test_background_response_is_polled_to_completed_on_another_gateway(stack: Stack) -> None:
    created = stack.client().responses.create(
        model=MODEL, input="In the background", background=True, metadata={"job": "poll"}
    )
    assert created.status == "queued" and created.background is True
    other = stack.client(stack.gateways[1])

    def finished() -> Any:
        response = other.responses.retrieve(created.id)
        return response if response.status not in ("queued", "in_progress") else None

    done = wait_for(finished, 30, "the background response to finish")
    assert done.status == "completed" and len(done.output_text.split()) >= 20
    assert done.metadata == {"job": "poll"}


def read_some(stream: Iterator[ResponseStreamEvent], count: int) -> list[ResponseStreamEvent]:
    events = []
    for event in stream:
        events.append(event)
        if len(events) == count:
            break
    return events


def test_background_stream_resumes_on_another_gateway_from_a_sequence_number(stack: Stack) -> None:
    client = stack.client()
    stream = client.responses.create(model=MODEL, input="resume me", background=True, stream=True)
    head = read_some(stream, 7)
    stream.close()
    last = head[-1].sequence_number
    response_id = head[0].response.id  # type: ignore[union-attr]
    other = stack.client(stack.gateways[1])
    tail = list(other.responses.retrieve(response_id, stream=True, starting_after=last))
    assert tail[0].sequence_number == last + 1
    assert_text_stream(head + tail)
    assert tail[-1].type == "response.completed"
    assert deltas(head + tail) == tail[-1].response.output_text  # type: ignore[union-attr]
    # A replay from the start is the same stream, event for event.
    replay = list(other.responses.retrieve(response_id, stream=True))
    assert [event.model_dump() for event in replay] == [event.model_dump() for event in head + tail]


def test_gateway_killed_mid_stream_and_the_sdk_resumes_elsewhere(stack: Stack) -> None:
    # On a loaded machine the SDK can read so far behind that the gateway had written the whole reply into
    # the socket before it was killed: that stream ends whole, without an error, and tests no resume. Such a
    # trial runs again, on a new gateway; the test needs one where the kill cut the stream.
    for _trial in range(5):
        doomed = stack.gateway()
        stream = stack.client(doomed).responses.create(
            model=MODEL, input="kill my gateway", background=True, stream=True
        )
        seen: list[ResponseStreamEvent] = []
        try:
            for event in stream:
                seen.append(event)
                if len(seen) == 8:
                    doomed.proc.kill()
        except (openai.APIConnectionError, httpx.HTTPError):
            break
        assert seen[-1].type == "response.completed", "a stream that ended without an error must be whole"
    else:
        pytest.fail("in 5 trials the gateway's kill never cut a stream short")
    assert len(seen) >= 8
    response_id = seen[0].response.id  # type: ignore[union-attr]
    rest = list(stack.client().responses.retrieve(response_id, stream=True, starting_after=seen[-1].sequence_number))
    assert_text_stream(seen + rest)
    final = stack.client().responses.retrieve(response_id)
    assert final.status == "completed" and deltas(seen + rest) == final.output_text


def test_worker_killed_mid_response_loses_and_repeats_nothing(stack: Stack) -> None:
    client = stack.client()
    body: dict[str, Any] = {"model": MODEL, "input": "kill my worker", "extra_body": {"seed": 5}}
    stream = client.responses.create(**body, background=True, stream=True)
    events: list[ResponseStreamEvent] = []
    for event in stream:
        events.append(event)
        if len(events) == 9:
            response_id = events[0].response.id  # type: ignore[union-attr]
            holder = stack.cluster.meta(response_id)["worker"]
            victim = next(worker for worker in stack.workers if worker.worker_id == holder)
            victim.proc.kill()
            stack.workers.remove(victim)
            stack.workers.append(stack.cluster.worker(**SLOW, wait=False))
    assert_text_stream(events)
    assert events[-1].type == "response.completed"
    assert int(stack.cluster.meta(response_id)["attempt"]) == 2
    uninterrupted = client.responses.create(**body)
    assert deltas(events) == uninterrupted.output_text


def test_cancel_stops_a_background_response(stack: Stack) -> None:
    client = stack.client()
    created = client.responses.create(model=LONG_MODEL, input="cancel me", background=True)

    def running() -> bool:
        return stack.cluster.meta(created.id).get("state") == "running"

    wait_for(running, 30, "the response to start")
    cancelled = stack.client(stack.gateways[1]).responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(created.id).status == "cancelled"
    events = list(client.responses.retrieve(created.id, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "cancelled"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    # Cancelling again answers with the response as it is; a response not in the background cannot be.
    assert client.responses.cancel(created.id).status == "cancelled"
    foreground = client.responses.create(model=MODEL, input="not background", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.cancel(foreground.id)


def test_delete_forgets_a_response(stack: Stack) -> None:
    client = stack.client()
    created = client.responses.create(model=MODEL, input="delete me", max_output_tokens=3)
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)
    assert not stack.cluster.redis.exists(keys.RequestKeys.of(created.id).events)


def test_input_items_list_what_was_sent(stack: Stack) -> None:
    client = stack.client()
    created = client.responses.create(
        model=MODEL,
        input=[
            {"role": "developer", "content": "Answer in filler words"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "first question"}]},
        ],
        max_output_tokens=3,
    )
    listed = client.responses.input_items.list(created.id)
    assert [item.role for item in listed.data] == ["user", "developer"]  # type: ignore[union-attr]
    assert listed.data[0].content[0].text == "first question"  # type: ignore[union-attr]
    ascending = client.responses.input_items.list(created.id, order="asc", limit=1)
    assert ascending.has_more is True and ascending.data[0].role == "developer"  # type: ignore[union-attr]
    after = client.responses.input_items.list(created.id, order="asc", after=ascending.last_id)
    assert [item.id for item in after.data] == [listed.data[0].id] and after.has_more is False


def test_previous_response_id_continues_the_conversation(stack: Stack) -> None:
    client = stack.client()
    first = client.responses.create(model=MODEL, input="My name is Ada", instructions="Be kind", max_output_tokens=4)
    second = stack.client(stack.gateways[1]).responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=4
    )
    assert second.status == "incomplete" and second.previous_response_id == first.id
    messages = json.loads(stack.job(second.id).body)["messages"]
    assert messages == [
        {"role": "user", "content": "My name is Ada"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]  # the first response's instructions do not carry over
    third = client.responses.create(model=MODEL, input="And now?", previous_response_id=second.id, max_output_tokens=2)
    assert len(json.loads(stack.job(third.id).body)["messages"]) == 5
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_" + "0" * 32)
    assert unknown.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_another_keys_response_is_a_404(stack: Stack) -> None:
    alice = stack.client()
    bob = stack.client(key=BOB)
    created = alice.responses.create(model=MODEL, input="mine", background=True, max_output_tokens=3)
    for attempt in (
        lambda: bob.responses.retrieve(created.id),
        lambda: list(bob.responses.retrieve(created.id, stream=True)),
        lambda: bob.responses.cancel(created.id),
        lambda: bob.responses.delete(created.id),
        lambda: bob.responses.input_items.list(created.id),
        lambda: bob.responses.create(model=MODEL, input="x", previous_response_id=created.id),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert alice.responses.retrieve(created.id).id == created.id


def test_bad_input_gets_openai_errors(stack: Stack) -> None:
    client = stack.client()
    tool = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(openai.BadRequestError) as tools:
        client.responses.create(model=MODEL, input="x", tools=[tool])  # type: ignore[list-item]
    assert tools.value.body["param"] == "tools" and "sim engine" in tools.value.body["message"]  # type: ignore[index]
    schema = {"type": "json_schema", "name": "answer", "schema": {"type": "object"}}
    with pytest.raises(openai.BadRequestError) as structured:
        client.responses.create(model=MODEL, input="x", text={"format": schema})  # type: ignore[typeddict-item]
    assert structured.value.body["param"] == "text.format"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="store"):
        client.responses.create(model=MODEL, input="x", background=True, store=False)
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": "x"}])  # type: ignore[list-item]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")
    unstored = client.responses.create(model=MODEL, input="x", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    done = client.responses.create(model=MODEL, input="x", max_output_tokens=2)
    beyond = list(client.responses.retrieve(done.id, stream=True, starting_after=500))
    assert [event.type for event in beyond] == ["error"] and beyond[0].code == "invalid_starting_after"  # type: ignore[union-attr]
    start = time.monotonic()
    assert list(client.responses.retrieve(done.id, stream=True, starting_after=done_last(client, done.id))) == []
    assert time.monotonic() - start < 10


def done_last(client: openai.OpenAI, response_id: str) -> int:
    return list(client.responses.retrieve(response_id, stream=True))[-1].sequence_number


# -- the renderer alone: what the sim engine cannot produce (reasoning, tool calls), from stored events ------


def rendered(events: list[wire.Event]) -> list[dict[str, Any]]:
    from tokenspool.gateway.responses import ResponseRenderer, ResponsesRequest, dump
    from tokenspool.shared.store import RequestMeta

    request = ResponsesRequest.model_validate({"model": "m", "input": "hi"})
    meta = RequestMeta.from_hash("resp_" + "ab" * 16, {b"model": b"m", b"created_s": b"7", b"format": b"response"})
    renderer = ResponseRenderer(meta, request)
    out = renderer.start()
    for event in events:
        out += renderer.feed(event)
    return [dump(event) for event in out]


def test_reasoning_text_and_tool_calls_render_as_vllm_streams_them() -> None:
    call = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q"'}}]
    more = [{"index": 0, "function": {"arguments": ': "x"}'}}]
    second = [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "other", "arguments": "{}"}}]
    stored = [
        wire.Event("delta", reasoning="thinking"),
        wire.Event("delta", text="Let me look.", reasoning=" more"),  # reasoning first, as vLLM splits a delta
        wire.Event("delta", tool_calls=json.dumps(call)),
        wire.Event("delta", tool_calls=json.dumps(more)),
        wire.Event("handover", message="continued"),
        wire.Event("delta", tool_calls=json.dumps(second), finish_reason="tool_calls"),
        wire.Event("end", finish_reason="tool_calls", prompt_tokens=4, completion_tokens=9, reasoning_tokens=2),
    ]
    events = rendered(stored)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert [event["type"] for event in events[2:]] == [
        "response.output_item.added",  # reasoning
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",  # message
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",  # first call
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",  # second call
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    output = events[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["reasoning", "message", "function_call", "function_call"]
    assert output[0]["content"] == [{"type": "reasoning_text", "text": "thinking more"}]
    assert output[2] | {"id": None} == {
        "type": "function_call",
        "id": None,
        "call_id": "call_1",
        "name": "lookup",
        "arguments": '{"q": "x"}',
        "status": "completed",
    }
    assert output[3]["call_id"] == "call_2" and output[3]["arguments"] == "{}"
    # The reasoning tokens the worker's parser counted (vLLM's usage counts them likewise).
    assert events[-1]["response"]["usage"]["output_tokens_details"]["reasoning_tokens"] == 2
    # The same stored events give the same events, ids included, wherever and whenever they are rendered.
    assert rendered(stored) == events


def test_node_sdk_resumes_a_background_stream_on_another_gateway(stack: Stack) -> None:
    """The official Node SDK (tests/node, `npm ci --prefix tests/node`), unchanged."""
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.fail("the Node SDK is not installed: run `npm ci --prefix tests/node` (node 20 or later)")
    first, second = (gateway.url + "/v1" for gateway in stack.gateways)
    done = subprocess.run(
        [node, str(NODE_DIR / "resume_response.mjs"), first, second, ALICE, MODEL],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["seen"] == list(range(len(result["seen"]))) and len(result["seen"]) > 6
    assert result["lastType"] == "response.completed" and result["status"] == "completed"
    assert result["text"] == result["output"] and result["text"]
