"""Chunk rendering (gateway/chunks.py): OpenAI chunks and bodies, byte-identical live and on replay."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from tests.samples import meta
from tests.sse_spec import frame_events, parse_sse
from tokenspool.gateway.chunks import ChunkRenderer, completion_body
from tokenspool.shared import keys, wire
from tokenspool.shared.store import RequestMeta

STREAM_EVENTS = [
    wire.Event("delta", "Hello", (1,)),
    wire.Event("delta", " wörld 👋\n", (2, 3)),
    wire.Event("delta", "", (4,), finish_reason="stop", prompt_tokens=5, completion_tokens=4),
    wire.Event("end", finish_reason="stop", prompt_tokens=5, completion_tokens=4),
]


@pytest.mark.parametrize("stream_format", ["chat", "completion", "simple"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_rendering_is_byte_identical_across_renderers(stream_format: str, include_usage: bool) -> None:
    items = [(seq, wire.encode(event)) for seq, event in enumerate(STREAM_EVENTS, start=1)]
    first = ChunkRenderer(meta(stream_format, include_usage)).frames(items)
    second = ChunkRenderer(meta(stream_format, include_usage)).frames(items)
    assert first == second
    # rendering in pieces (a live relay) equals rendering at once (a replay)
    third = ChunkRenderer(meta(stream_format, include_usage))
    assert b"".join(third.frames([item]) for item in items) == first
    events, _ = parse_sse(first)
    request_id = meta(stream_format).request_id
    with_ids = events[1:] if stream_format == "chat" else events  # the role chunk has no id of its own
    assert all(keys.parse_event_id(e.last_event_id)[0] == request_id for e in with_ids)


@pytest.mark.parametrize("choices", [1, 3])
def test_a_chat_stream_opens_with_a_role_chunk_per_choice_as_vllm_does(choices: int) -> None:
    frames = ChunkRenderer(dataclasses.replace(meta("chat"), choices=choices)).frames(
        [(seq, wire.encode(event)) for seq, event in enumerate(STREAM_EVENTS, start=1)]
    )
    events, _ = parse_sse(frames)
    opening = [orjson.loads(e.data) for e in events[:choices]]
    assert [c["choices"] for c in opening] == [
        [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        for i in range(choices)
    ]
    assert all(e.last_event_id == "" for e in events[:choices])
    assert orjson.loads(events[choices].data)["choices"][0]["delta"] == {"content": "Hello"}
    resumed = ChunkRenderer(meta("chat")).frames([(2, wire.encode(STREAM_EVENTS[1]))])
    assert b"role" not in resumed, "a resumed stream had its role chunks already"


def test_a_reply_in_another_role_opens_and_ends_in_that_role() -> None:
    """Without a generation prompt vLLM answers in the last message's role; it is stored in the metadata, so
    the role chunk and the folded message say it on any gateway."""
    user = dataclasses.replace(meta("chat"), role="user")
    frames = ChunkRenderer(user).frames([(seq, wire.encode(event)) for seq, event in enumerate(STREAM_EVENTS, 1)])
    events, _ = parse_sse(frames)
    assert orjson.loads(events[0].data)["choices"][0]["delta"] == {"role": "user", "content": ""}
    message = completion_body(user, list(STREAM_EVENTS[:3]), STREAM_EVENTS[3])["choices"][0]["message"]
    assert message["role"] == "user"


@pytest.mark.parametrize("stream_format", ["chat", "completion"])
def test_token_ids_are_shown_where_vllm_shows_them(stream_format: str) -> None:
    """``return_token_ids``: the prompt's ids (stored on a choice's first delta) in a chat's role chunk and
    body, on a completion's choice; every chunk and choice with its own ids."""
    asked = dataclasses.replace(meta(stream_format), token_ids=True)
    events = [dataclasses.replace(STREAM_EVENTS[0], prompt_token_ids=(1, 7)), *STREAM_EVENTS[1:]]
    frames = ChunkRenderer(asked).frames([(seq, wire.encode(event)) for seq, event in enumerate(events, start=1)])
    chunks = [orjson.loads(e.data) for e in parse_sse(frames)[0] if e.data != "[DONE]"]
    body = completion_body(asked, events[:3], events[3])
    if stream_format == "chat":
        assert chunks[0]["prompt_token_ids"] == [1, 7] and "role" in chunks[0]["choices"][0]["delta"]
        assert [c["choices"][0]["token_ids"] for c in chunks[1:]] == [[1], [2, 3], [4]]
        assert body["prompt_token_ids"] == [1, 7]
    else:
        assert [c["choices"][0].get("prompt_token_ids") for c in chunks] == [[1, 7], None, None]
        assert [c["choices"][0]["token_ids"] for c in chunks] == [[1], [2, 3], [4]]
        assert body["choices"][0]["prompt_token_ids"] == [1, 7]
    assert body["choices"][0]["token_ids"] == [1, 2, 3, 4]
    plain = ChunkRenderer(meta(stream_format)).frames([(1, wire.encode(STREAM_EVENTS[0]))])
    assert b"token_ids" not in plain, "shown only when asked for"
    if stream_format == "completion":  # an echoed prompt's ids (stored for echo): vLLM's stream names them
        echoed = orjson.loads(ChunkRenderer(meta(stream_format)).data(1, events[0]) or b"")["choices"][0]
        assert echoed["prompt_token_ids"] == [1, 7] and "token_ids" not in echoed


def test_chat_rendering_of_deltas() -> None:
    renderer = ChunkRenderer(meta("chat"))
    first = orjson.loads(renderer.data(1, STREAM_EVENTS[0]) or b"")
    second = orjson.loads(renderer.data(2, STREAM_EVENTS[1]) or b"")
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"content": "Hello"}
    assert second["choices"][0]["delta"] == {"content": " wörld 👋\n"}
    assert first["choices"][0]["finish_reason"] is None
    assert first["id"] == meta().request_id
    assert first["created"] == 1_700_000_000
    assert first["model"] == "tokenspool-sim"
    assert "usage" not in first
    last = orjson.loads(renderer.data(3, STREAM_EVENTS[2]) or b"")
    assert last["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("text", ["plain", ' "quoted" \\ back\nslash', "wörld 👋", "\u2028\x00\x1f", ""])
def test_a_plain_chat_delta_renders_exactly_as_the_full_chunk_would(include_usage: bool, text: str) -> None:
    renderer = ChunkRenderer(meta("chat", include_usage))
    chunk: dict[str, object] = {
        "id": meta().request_id,
        "created": 1_700_000_000,
        "model": "tokenspool-sim",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}],
    }
    if include_usage:
        chunk["usage"] = None
    assert renderer.data(2, wire.Event("delta", text, (7,))) == orjson.dumps(chunk)


def test_without_include_usage_the_end_event_renders_to_nothing() -> None:
    for fmt in ("chat", "completion"):
        renderer = ChunkRenderer(meta(fmt, include_usage=False))
        assert renderer.data(4, STREAM_EVENTS[3]) is None
        assert renderer.frames([(4, wire.encode(STREAM_EVENTS[3]))]) == b""


@pytest.mark.parametrize("stream_format", ["chat", "completion"])
def test_include_usage_adds_null_usage_and_a_usage_chunk(stream_format: str) -> None:
    renderer = ChunkRenderer(meta(stream_format, include_usage=True))
    delta = orjson.loads(renderer.data(1, STREAM_EVENTS[0]) or b"")
    assert "usage" in delta
    assert delta["usage"] is None
    end = orjson.loads(renderer.data(4, STREAM_EVENTS[3]) or b"")
    assert end["choices"] == []
    assert end["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    expected_object = "chat.completion.chunk" if stream_format == "chat" else "text_completion"
    assert end["object"] == delta["object"] == expected_object


CONTINUOUS_EVENTS = [
    wire.Event("delta", "Hello", (1,), prompt_tokens=5, completion_tokens=1),
    wire.Event("delta", " wörld", (2, 3), prompt_tokens=5, completion_tokens=3),
    wire.Event("delta", "", (4,), finish_reason="stop", prompt_tokens=5, completion_tokens=4),
    wire.Event("end", finish_reason="stop", prompt_tokens=5, completion_tokens=4),
]


def continuous_meta(stream_format: str) -> RequestMeta:
    return dataclasses.replace(meta(stream_format, include_usage=True), continuous_usage=True)


@pytest.mark.parametrize("stream_format", ["chat", "completion"])
def test_continuous_usage_puts_the_usage_so_far_on_every_chunk_as_vllm_does(stream_format: str) -> None:
    items = [(seq, wire.encode(event)) for seq, event in enumerate(CONTINUOUS_EVENTS, start=1)]
    frames = ChunkRenderer(continuous_meta(stream_format)).frames(items)
    chunks = [orjson.loads(e.data) for e in parse_sse(frames)[0]]
    usages = [
        (c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"], c["usage"]["total_tokens"]) for c in chunks
    ]
    deltas = [(5, 1, 6), (5, 3, 8), (5, 4, 9)]
    opening = [(5, 0, 5)] if stream_format == "chat" else []  # vLLM's role chunk counts nothing generated
    assert usages == [*opening, *deltas, (5, 4, 9)]
    assert chunks[-1]["choices"] == []
    # a replay from the middle is the live stream's tail, byte for byte
    resumed = ChunkRenderer(continuous_meta(stream_format)).frames(items[2:])
    assert frames.endswith(resumed) and b"role" not in resumed


@pytest.mark.parametrize("text", ["plain", ' "quoted" \\ back\nslash', "wörld 👋"])
def test_a_plain_chat_delta_with_continuous_usage_renders_exactly_as_the_full_chunk_would(text: str) -> None:
    event = wire.Event("delta", text, (7,), prompt_tokens=12, completion_tokens=3)
    chunk = {
        "id": meta().request_id,
        "created": 1_700_000_000,
        "model": "tokenspool-sim",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
    assert ChunkRenderer(continuous_meta("chat")).data(2, event) == orjson.dumps(chunk)


def test_continuous_usage_with_a_reasoning_parser_counts_the_reasoning_so_far_on_every_chunk() -> None:
    """vLLM's chat server gives every chunk's usage ``completion_tokens_details`` when it has a reasoning
    parser: 0 on the role chunk, each choice's reasoning tokens so far on its deltas (stored on them)."""
    events = [
        wire.Event("delta", "", (1,), prompt_tokens=5, completion_tokens=1, reasoning="hm", reasoning_tokens=1),
        wire.Event("delta", "Hi", (2, 3), prompt_tokens=5, completion_tokens=3, reasoning_tokens=1),
        wire.Event("delta", "", (4,), finish_reason="stop", prompt_tokens=5, completion_tokens=4, reasoning_tokens=1),
        wire.Event("end", finish_reason="stop", prompt_tokens=5, completion_tokens=4, reasoning_tokens=1),
    ]
    items = [(seq, wire.encode(event)) for seq, event in enumerate(events, start=1)]
    chunks = [orjson.loads(e.data) for e in parse_sse(ChunkRenderer(continuous_meta("chat")).frames(items))[0]]
    details = [c["usage"]["completion_tokens_details"] for c in chunks]
    assert details == [{"reasoning_tokens": 0}] + [{"reasoning_tokens": 1}] * 4


def test_an_engine_refusal_streamed_names_its_parameter() -> None:
    refusal = wire.Event("error", error_type="BadRequestError", message="n must be 1", param="n")
    body = orjson.loads(ChunkRenderer(meta("chat")).data(1, refusal) or b"")
    assert body["error"]["param"] == "n"


def test_completion_rendering_uses_text_choices() -> None:
    renderer = ChunkRenderer(meta("completion"))
    chunk = orjson.loads(renderer.data(1, STREAM_EVENTS[0]) or b"")
    assert chunk["object"] == "text_completion"
    assert chunk["choices"] == [{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": None}]


def test_simple_format_renders_token_and_done() -> None:
    renderer = ChunkRenderer(meta("simple"))
    assert orjson.loads(renderer.data(1, STREAM_EVENTS[0]) or b"") == {"token": "Hello", "done": False}
    assert orjson.loads(renderer.data(2, STREAM_EVENTS[1]) or b"") == {"token": " wörld 👋\n", "done": False}
    end = orjson.loads(renderer.data(4, STREAM_EVENTS[3]) or b"")
    assert end == {"token": "", "done": True, "finish_reason": "stop"}


@pytest.mark.parametrize("stream_format", ["chat", "completion", "simple"])
def test_error_events_render_as_openai_errors(stream_format: str) -> None:
    renderer = ChunkRenderer(meta(stream_format))
    body = orjson.loads(renderer.data(2, wire.Event("error", error_type="cancelled", message="bye")) or b"")
    assert body["error"]["type"] == "cancelled"
    assert body["error"]["message"] == "bye"
    assert body.get("done") is (True if stream_format == "simple" else None)


def test_rendered_text_with_newlines_survives_the_frame() -> None:
    renderer = ChunkRenderer(meta("chat"))
    frame = renderer.frames([(2, wire.encode(wire.Event("delta", "a\r\nb\u2028c", (1,))))])
    events = frame_events(frame)
    assert len(events) == 1
    assert orjson.loads(events[0].data)["choices"][0]["delta"]["content"] == "a\r\nb\u2028c"


def test_completion_body_for_chat_and_completion() -> None:
    end = STREAM_EVENTS[3]
    deltas = [wire.Event("delta", "Hello", (1,)), wire.Event("delta", " world", (2,))]
    chat = completion_body(meta("chat"), deltas, end)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    assert chat["usage"]["total_tokens"] == 9
    text = completion_body(meta("completion"), deltas, end)
    assert text["object"] == "text_completion"
    assert text["choices"][0]["text"] == "Hello world"
    assert text["choices"][0]["finish_reason"] == "stop"


def test_a_stored_answer_is_the_choice_of_a_chat_body_instead_of_the_folded_pieces() -> None:
    """vLLM answers a request that is not streamed from its whole output, parsed again: where that differs
    from the streamed pieces (here arguments re-serialised, a null content), the worker stores it on the
    choice's last delta and the body says exactly that; choices without one are folded as before."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    answer = {"content": None, "reasoning": "hm", "tool_calls": [call], "finish_reason": "tool_calls"}
    pieces = '[{"index":0,"id":"c1","type":"function","function":{"name":"f","arguments":"{\\"a\\" :1}"}}]'
    deltas = [
        wire.Event("delta", "", (1,), reasoning="hm"),
        wire.Event("delta", "", (2,), "tool_calls", tool_calls=pieces, answer=orjson.dumps(answer).decode()),
        wire.Event("delta", "plain", (3,), "length", index=1),
    ]
    body = completion_body(meta("chat"), deltas, STREAM_EVENTS[3])
    first, second = body["choices"]
    assert first["message"] == {"role": "assistant", "content": None, "reasoning": "hm", "tool_calls": [call]}
    assert first["finish_reason"] == "tool_calls"
    assert (second["message"], second["finish_reason"]) == ({"role": "assistant", "content": "plain"}, "length")


@pytest.mark.parametrize("reasoning_tokens", [None, 0, 3])
def test_usage_has_completion_tokens_details_only_when_the_worker_counts_reasoning(
    reasoning_tokens: int | None,
) -> None:
    """vLLM with a reasoning parser reports reasoning tokens (0 too) in ``completion_tokens_details``; without
    one it reports none. The end event says which (its ``reasoning_tokens`` is None without)."""
    end = dataclasses.replace(STREAM_EVENTS[3], reasoning_tokens=reasoning_tokens)
    body = completion_body(meta("chat"), list(STREAM_EVENTS[:3]), end)
    usage_chunk = orjson.loads(ChunkRenderer(meta("chat", include_usage=True)).data(4, end) or b"")
    for usage in (body["usage"], usage_chunk["usage"]):
        details = None if reasoning_tokens is None else {"reasoning_tokens": reasoning_tokens}
        assert usage.get("completion_tokens_details") == details
