"""Property-based tests (hypothesis) of the two encoders everything passes through: the msgpack wire codec
(every payload round-trips; any bytes decode or fail with WireError, never anything else) and the SSE
encoder (whatever text an event, id or comment holds — newlines of every kind, NUL, odd Unicode, text that
looks like SSE fields — a spec parser sees exactly the event or comment that was meant, and nothing else)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.sse_spec import parse_sse
from tokenspool.gateway.settings import ApiKey, parse_api_keys
from tokenspool.gateway.sse import comment_frame, data_frame, event_frame
from tokenspool.shared import wire
from tokenspool.shared.settings import SettingsError

# Text with every code point but lone surrogates (which no str from JSON, msgpack or a tokenizer holds),
# weighted towards the characters that matter to SSE.
SPECIAL = st.sampled_from(["\r", "\n", "\r\n", "\0", ":", " ", "data: ", "id: ", "\ufeff", "\u2028", "\x85", "é"])
TEXT = st.lists(st.one_of(st.text(max_size=20), SPECIAL), max_size=12).map("".join)
ANY_STR = st.lists(
    st.one_of(
        st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=10),
        st.sampled_from(["\ud800", "\udfff", "\ud83d"]),
    ),
    max_size=6,
).map("".join)
"""Every code point, lone surrogates included: what a buggy caller could pass."""

small_ints = st.integers(min_value=0, max_value=2**31)
opt_float = st.none() | st.floats(allow_nan=False, allow_infinity=False, width=64)

events = st.builds(
    wire.Event,
    kind=st.sampled_from(["delta", "end", "error", "handover"]),
    text=TEXT,
    token_ids=st.lists(small_ints, max_size=8).map(tuple),
    finish_reason=st.none() | st.sampled_from(["stop", "length"]),
    prompt_tokens=small_ints,
    completion_tokens=small_ints,
    error_type=TEXT,
    message=TEXT,
    logprobs=st.lists(
        st.builds(
            wire.TokenLogprob,
            token=TEXT,
            logprob=st.floats(allow_nan=False, allow_infinity=False),
            top=st.lists(st.tuples(TEXT, st.floats(allow_nan=False, allow_infinity=False)), max_size=3).map(tuple),
        ),
        max_size=3,
    ).map(tuple),
    text_offset=small_ints,
)
jobs = st.builds(
    wire.Job,
    request_id=TEXT,
    kind=st.sampled_from(["chat", "completion"]),
    model=TEXT,
    prompt=TEXT,
    messages=st.lists(st.builds(wire.ChatMessage, role=TEXT, content=TEXT), max_size=4).map(tuple),
    sampling=st.builds(
        wire.SamplingOptions,
        max_tokens=st.none() | small_ints,
        temperature=opt_float,
        top_p=opt_float,
        seed=st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
        stop=st.lists(TEXT, max_size=4).map(tuple),
        top_k=st.none() | st.integers(min_value=-1, max_value=1000),
        min_p=opt_float,
        presence_penalty=opt_float,
        frequency_penalty=opt_float,
        repetition_penalty=opt_float,
        ignore_eos=st.booleans(),
        stop_token_ids=st.lists(small_ints, max_size=4).map(tuple),
        logprobs=st.none() | st.integers(min_value=0, max_value=20),
    ),
    created_s=small_ints,
    enqueued_ms=small_ints,
    background=st.booleans(),
)


# -- wire ---------------------------------------------------------------------------------------------------


@given(events)
def test_every_event_round_trips_through_the_wire_codec(event: wire.Event) -> None:
    assert wire.decode(wire.encode(event), wire.Event) == event


@given(jobs)
def test_every_job_round_trips_through_the_wire_codec(job: wire.Job) -> None:
    assert wire.decode(wire.encode(job), wire.Job) == job


@settings(max_examples=500)
@given(st.binary(max_size=64) | events.map(wire.encode).map(lambda b: b[: len(b) // 2]))
def test_any_bytes_decode_to_a_payload_or_fail_with_wire_error_only(data: bytes) -> None:
    for kind in (wire.Event, wire.Job, wire.WorkerInfo):
        try:
            decoded = wire.decode(data, kind)
        except wire.WireError:
            continue
        assert isinstance(decoded, kind)


# -- SSE ----------------------------------------------------------------------------------------------------


def sanitized_id(event_id: str) -> str:
    return event_id.replace("\r", "").replace("\n", "").replace("\0", "")


@settings(max_examples=400)
@given(event_id=TEXT, data=TEXT)
def test_an_event_frame_is_one_event_with_exactly_its_data_and_sanitized_id(event_id: str, data: str) -> None:
    parsed, comments = parse_sse(event_frame(event_id, data.encode()))
    assert comments == []
    assert len(parsed) == 1
    # SSE has one line terminator in data (LF); CR and CRLF arrive as LF, as the encoder documents
    assert parsed[0].data == data.replace("\r\n", "\n").replace("\r", "\n")
    assert parsed[0].last_event_id == sanitized_id(event_id)
    assert parsed[0].type == "message"


@given(event_id=ANY_STR, text=ANY_STR)
def test_frames_are_valid_utf_8_whatever_str_they_are_given(event_id: str, text: str) -> None:
    for frame in (event_frame(event_id, b"x"), comment_frame(text)):
        frame.decode("utf-8")  # raises on a lone surrogate that slipped through


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["event", "comment", "data"]), TEXT, TEXT), min_size=1, max_size=6))
def test_a_stream_of_frames_parses_to_exactly_those_events_and_comments(
    frames: list[tuple[str, str, str]],
) -> None:
    stream = b""
    expected_events: list[tuple[str, str]] = []
    expected_comments: list[str] = []
    last_id = ""
    for kind, first, second in frames:
        if kind == "event":
            stream += event_frame(first, second.encode())
            last_id = sanitized_id(first)
            expected_events.append((second.replace("\r\n", "\n").replace("\r", "\n"), last_id))
        elif kind == "comment":
            stream += comment_frame(first)
            expected_comments.append(" " + first.replace("\r", " ").replace("\n", " "))
        else:
            stream += data_frame(second.encode())
            expected_events.append((second.replace("\r", " ").replace("\n", " "), last_id))
    parsed, comments = parse_sse(stream)
    assert [(e.data, e.last_event_id) for e in parsed] == expected_events
    assert comments == expected_comments


# -- API key entries ----------------------------------------------------------------------------------------


@given(st.lists(TEXT, min_size=1, max_size=4))
def test_key_entries_parse_to_hashes_or_fail_without_echoing_the_key(entries: list[str]) -> None:
    try:
        parsed = parse_api_keys(entries, "TOKENSPOOL_API_KEYS")
    except SettingsError as exc:
        for entry in entries:
            if len(entry.strip()) >= 4:
                assert entry.strip() not in str(exc)
        return
    for entry, key in zip(entries, parsed, strict=True):
        assert isinstance(key, ApiKey) and len(key.sha256) == 64
        secret = entry.strip().removeprefix(key.name + ":")
        if not secret.startswith("sha256:"):
            assert (
                key.sha256 == hashlib.sha256(secret.encode()).hexdigest()
                or key.sha256 == hashlib.sha256(entry.strip().encode()).hexdigest()
            )
            assert secret not in repr(key)


@pytest.mark.parametrize("entry", ["short", "has space inside-0123456789", "comma,0123456789abcdef", "é" * 20])
def test_unusable_key_entries_are_refused(entry: str) -> None:
    with pytest.raises(SettingsError, match="not usable"):
        parse_api_keys([entry], "TOKENSPOOL_API_KEYS")
