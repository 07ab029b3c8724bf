"""The wire format (shared/wire.py): round trips, refusals of every malformed payload, the encoded size."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.samples import request_id_with
from tokenspool.shared import keys, wire


def full_job() -> wire.Job:
    return wire.Job(
        request_id=request_id_with("a"),
        kind="chat",
        model="m/one",
        prompt="",
        messages=(wire.ChatMessage("system", "be brief"), wire.ChatMessage("user", "héllo 👋")),
        sampling=wire.SamplingOptions(
            max_tokens=16,
            temperature=0.5,
            top_p=0.9,
            seed=-3,
            stop=("\n\n", "END"),
            top_k=40,
            min_p=0.05,
            presence_penalty=0.1,
            frequency_penalty=-0.2,
            repetition_penalty=1.1,
            ignore_eos=True,
            stop_token_ids=(2, 32000),
        ),
        created_s=1_700_000_000,
        enqueued_ms=1_700_000_000_123,
    )


def worker_info() -> wire.WorkerInfo:
    return wire.WorkerInfo(
        worker_id="host-1-abc",
        model="tokenspool-sim",
        engine="sim",
        capacity=64,
        running=3,
        state="draining",
        host="host",
        pid=1234,
        started_ms=1,
        heartbeat_ms=2,
        owned_by="someone",
        max_model_len=4096,
        unsupported=("logprobs", "top_k"),
        engine_running=2,
    )


@pytest.mark.parametrize(
    "payload",
    [
        full_job(),
        dataclasses.replace(
            full_job(), kind="completion", prompt="once upon", messages=(), sampling=wire.SamplingOptions()
        ),
        wire.Event("delta", " word", (1, 2, 3)),
        wire.Event("delta", "last", (9,), finish_reason="length", prompt_tokens=5, completion_tokens=7),
        wire.Event("end", finish_reason="stop", prompt_tokens=11, completion_tokens=22),
        wire.Event("error", error_type="cancelled", message="cancelled by the client"),
        wire.Event("delta", "", (4,), "stop", index=1, reasoning="hm", tool_calls="[]", answer='{"content":null}'),
        wire.Event("end", finish_reason="stop", prompt_tokens=3, completion_tokens=4, reasoning_tokens=0),
        wire.Event("end", finish_reason="stop", prompt_tokens=3, completion_tokens=4, reasoning_tokens=2),
        wire.Event("delta", "a", (4,), index=1, prompt_token_ids=(1, 20, 21)),
        wire.Event("error", error_type="BadRequestError", message="n must be 1", param="n"),
        worker_info(),
        dataclasses.replace(worker_info(), unsupported=(), owned_by="tokenspool"),
    ],
    ids=lambda p: type(p).__name__,
)
def test_wire_round_trip_preserves_every_field(payload: wire.Payload) -> None:
    data = wire.encode(payload)
    kind: Any = type(payload)
    decoded = wire.decode(data, kind)
    assert decoded == payload
    assert type(decoded) is type(payload)
    assert wire.encode(decoded) == data


def test_wire_round_trip_keeps_tuples_hashable() -> None:
    job = wire.decode(wire.encode(full_job()), wire.Job)
    hash(job)  # frozen dataclasses of tuples only: lists would make this raise
    info = wire.decode(wire.encode(worker_info()), wire.WorkerInfo)
    assert isinstance(info.unsupported, tuple)
    assert isinstance(job.sampling.stop_token_ids, tuple)


def test_wire_event_with_a_few_tokens_is_under_40_bytes() -> None:
    data = wire.encode(wire.Event("delta", " lantern", (1734, 29871, 13)))
    assert len(data) < 40


def test_an_error_event_without_a_param_is_stored_as_before_it_had_one() -> None:
    """The parameter a refusal names is an optional trailing field: an error event without one (every error
    but vLLM's refusals) is the eight fields it always was."""
    plain = wire.Event("error", error_type="cancelled", message="cancelled by the client")
    assert msgpack.unpackb(wire.encode(plain)) == [1, 2, "error", "", [], None, 0, 0, "cancelled", plain.message]
    named = dataclasses.replace(plain, error_type="BadRequestError", param="n")
    assert wire.decode(wire.encode(named), wire.Event).param == "n"


def test_wire_decode_rejects_another_version() -> None:
    data = wire.encode(wire.Event("delta", "x", (1,)))
    items = msgpack.unpackb(data)
    for version in (wire.WIRE_VERSION + 1, 0, "1", None):
        with pytest.raises(wire.WireError, match="version"):
            wire.decode(msgpack.packb([version, *items[1:]]), wire.Event)


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (full_job(), wire.Event),
        (wire.Event("end"), wire.Job),
        (worker_info(), wire.Event),
        (wire.Event("end"), wire.WorkerInfo),
    ],
)
def test_wire_decode_rejects_a_payload_of_another_type(payload: wire.Payload, kind: type[Any]) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(wire.encode(payload), kind)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        b"\x00",
        msgpack.packb({"v": 1}),
        msgpack.packb([1]),
        msgpack.packb("text"),
        msgpack.packb([1, 2, "delta"]),  # too few fields
        msgpack.packb([1, 2, "delta", "", [], None, 0, 0, "", "", "extra"]),  # too many
        msgpack.packb([1, 2, "delta", "", 5, None, 0, 0, "", ""]),  # token_ids not a sequence
        b"\xa2\xff\xfe",  # a str that is not UTF-8
        b"\xdd\xff\xff\xff\xff",  # an array header claiming 4 billion items
        b"\x91" * 100_000 + b"\x01",  # nesting deeper than any payload
        wire.encode(wire.Event("end")) + b"\x00",  # trailing bytes
    ],
)
def test_wire_decode_rejects_garbage_with_wire_error(garbage: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(garbage, wire.Event)


@pytest.mark.parametrize(
    "payload", [full_job(), wire.Event("delta", " abc", (1, 2)), worker_info()], ids=lambda p: type(p).__name__
)
def test_wire_decode_rejects_every_truncation(payload: wire.Payload) -> None:
    data = wire.encode(payload)
    kind: Any = type(payload)
    for cut in range(len(data)):
        with pytest.raises(wire.WireError):
            wire.decode(data[:cut], kind)


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(wire.WireError, ValueError)


def test_a_job_encodes_exactly_as_its_fields_as_nested_lists() -> None:
    """The encoder walks the dataclasses itself (no deep copies); the bytes are those of the plain lists."""
    job = wire.Job(
        request_id=keys.new_request_id("chat"),
        kind="chat",
        model="m",
        prompt="",
        messages=(wire.ChatMessage("system", "be brief"), wire.ChatMessage("user", "hi")),
        sampling=wire.SamplingOptions(max_tokens=5, stop=("a", "b"), stop_token_ids=(1, 2), seed=7),
        created_s=1,
        enqueued_ms=2,
    )

    def as_lists(value: object) -> object:
        return [as_lists(item) for item in value] if isinstance(value, tuple) else value

    # the trailing ``continuous_usage`` is written only when set (an older reader reads a plain job)
    reference = [as_lists(value) for value in dataclasses.astuple(job)][:-1]
    version, _tag, *fields = msgpack.unpackb(wire.encode(job), raw=False)
    assert version == wire.WIRE_VERSION and fields == reference
    assert wire.decode(wire.encode(job), wire.Job) == job


def test_a_job_asking_for_continuous_usage_round_trips_and_a_plain_one_reads_as_before() -> None:
    plain = full_job()
    continuous = dataclasses.replace(plain, continuous_usage=True)
    assert wire.decode(wire.encode(continuous), wire.Job) == continuous
    assert len(wire.encode(continuous)) == len(wire.encode(plain)) + 1
    _version, _tag, *fields = msgpack.unpackb(wire.encode(plain), raw=False)
    assert len(fields) == len(dataclasses.fields(wire.Job)) - 1, "a plain job has no trailing flag"
    assert wire.decode(wire.encode(plain), wire.Job).continuous_usage is False


@pytest.mark.parametrize(
    "event",
    [
        wire.Event("delta", " word", (1, 2, 3)),
        wire.Event("delta", "last", (9,), finish_reason="length", index=3, answer="{}"),
        wire.Event("handover", message="w2"),
        wire.Event("end", finish_reason="stop", prompt_tokens=11, completion_tokens=22, reasoning_tokens=2),
        wire.Event("error", error_type="cancelled", message="cancelled by the client", param="n"),
    ],
    ids=lambda e: e.kind,
)
def test_is_terminal_reads_from_the_first_fields_what_a_full_decode_says(event: wire.Event) -> None:
    data = wire.encode(event)
    assert wire.is_terminal(data) is event.terminal is wire.decode(data, wire.Event).terminal


@pytest.mark.parametrize("garbage", [b"", b"\xc1", b"\x93\x01", msgpack.packb("text")])
def test_is_terminal_rejects_what_is_not_an_event_with_wire_error(garbage: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.is_terminal(garbage)


def test_is_terminal_reads_an_event_packed_another_way_with_msgpack() -> None:
    """An event written by another msgpack encoder (here: its kind as a str 8, not a fixstr) still reads."""
    fields = [wire.WIRE_VERSION, 2, "end", "", [], "stop", 1, 1, "", ""]
    packed = msgpack.packb(fields)
    other = packed[:3] + b"\xd9\x03end" + packed[7:]
    assert other != packed and wire.decode(other, wire.Event).kind == "end"
    assert wire.is_terminal(other)


@pytest.mark.parametrize("cut", range(1, 8))
def test_is_terminal_of_a_truncated_event_is_a_wire_error_or_an_answer(cut: int) -> None:
    """The first bytes of an end event either still say ``end`` or are refused as undecodable: never an
    IndexError from the fast path."""
    data = wire.encode(wire.Event("end", finish_reason="stop"))[:cut]
    try:
        assert wire.is_terminal(data) == (cut >= 7)
    except wire.WireError:
        assert cut < 7


_JSON_LEAVES = st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text()
_JSON = st.recursive(
    _JSON_LEAVES | st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from(["\ud800", "ok\udfff", "é"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3) | st.just("k\ud800"), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(_JSON)
def test_the_fast_check_of_a_request_agrees_with_the_walks_that_name_the_bad_field(value: Any) -> None:
    """``carries`` (one msgpack call) answers as the two walks do together: false exactly when some text has
    no UTF-8 form or some integer is beyond 64 bits, anywhere in the value, keys included."""
    walks_find_nothing = wire.unencodable_text(value) is None and wire.unencodable_integer(value) is None
    assert wire.carries(value) == walks_find_nothing
