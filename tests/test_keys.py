"""Key names, request ids, partitions and event ids (shared/keys.py)."""

from __future__ import annotations

import re

import pytest
from redis.crc import key_slot

from tests.samples import HEX32, request_id_with
from tokenspool.shared import keys


@pytest.mark.parametrize(("kind", "prefix"), [("chat", "chatcmpl-"), ("completion", "cmpl-")])
def test_request_ids_carry_128_random_bits(kind: str, prefix: str) -> None:
    ids = {keys.new_request_id(kind) for _ in range(2000)}  # type: ignore[arg-type]
    assert len(ids) == 2000
    for request_id in ids:
        assert re.fullmatch(re.escape(prefix) + r"[0-9a-f]{32}", request_id)
        assert keys.is_request_id(request_id)


def test_partition_is_the_first_hex_digit_and_stable() -> None:
    for digit in "0123456789abcdef":
        for kind in ("chat", "completion"):
            request_id = request_id_with(digit, kind)
            assert keys.partition_of(request_id) == int(digit, 16)
            assert keys.partition_of(request_id) == keys.partition_of(request_id)
    seen = {keys.partition_of(keys.new_request_id("chat")) for _ in range(2000)}
    assert seen <= set(range(keys.PARTITIONS))


@pytest.mark.parametrize(
    "value",
    [
        "",
        "chatcmpl-",
        "chatcmpl-" + HEX32[:31],
        "chatcmpl-" + HEX32 + "0",
        "chatcmpl-" + HEX32.upper(),
        "chat-" + HEX32,
        "CHATCMPL-" + HEX32,
        " chatcmpl-" + HEX32,
        "chatcmpl-" + HEX32 + " ",
        "chatcmpl-" + HEX32 + "\n",
        "cmpl-" + HEX32[:-1] + "g",
        "ts:{p1}:r:chatcmpl-" + HEX32,
    ],
)
def test_foreign_request_ids_are_refused(value: str) -> None:
    assert not keys.is_request_id(value)
    with pytest.raises(ValueError):
        keys.partition_of(value)
    with pytest.raises(ValueError):
        keys.RequestKeys.of(value)


def test_all_keys_of_one_request_share_one_hash_slot() -> None:
    for _ in range(200):
        request_id = keys.new_request_id("completion")
        rk = keys.RequestKeys.of(request_id)
        assert rk.request_id == request_id
        assert len({rk.events, rk.meta, rk.job}) == 3
        slots = {key_slot(k.encode()) for k in (rk.events, rk.meta, rk.job)}
        assert len(slots) == 1
        # the slot is the partition's: every request of one partition lives in one slot
        assert slots == {key_slot(f"{{p{keys.partition_of(request_id)}}}".encode())}
        assert request_id in rk.events


def test_the_sixteen_partitions_are_sixteen_slots() -> None:
    slots = {key_slot(keys.RequestKeys.of(request_id_with(d)).events.encode()) for d in "0123456789abcdef"}
    assert len(slots) == keys.PARTITIONS


def test_queue_key_is_tagged_by_model_and_other_keys_are_stable() -> None:
    assert key_slot(keys.queue_key("llama-3").encode()) == key_slot(b"llama-3")
    assert keys.queue_key("a") != keys.queue_key("b")
    assert keys.workers_key() == keys.workers_key()
    assert keys.idempotency_key("alice", "k1") == keys.idempotency_key("alice", "k1")
    assert keys.idempotency_key("alice", "k1") != keys.idempotency_key("bob", "k1")
    # the separator cannot be forged by moving text between owner and key
    assert keys.idempotency_key("ab", "c") != keys.idempotency_key("a", "bc")


@pytest.mark.parametrize("seq", [1, 2, 99, 10**11])
def test_stream_entry_ids_round_trip(seq: int) -> None:
    entry = keys.stream_entry_id(seq)
    assert entry == f"{seq}-0"
    assert keys.seq_of_entry_id(entry) == seq
    assert keys.seq_of_entry_id(entry.encode()) == seq


@pytest.mark.parametrize("seq", [0, 1, 42, 999_999_999_999])
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_event_id_round_trips(kind: str, seq: int) -> None:
    request_id = keys.new_request_id(kind)  # type: ignore[arg-type]
    value = keys.event_id(request_id, seq)
    assert keys.parse_event_id(value) == (request_id, seq)


@pytest.mark.parametrize(
    "value",
    [
        "",
        ":",
        "chatcmpl-" + HEX32,  # no colon
        "chatcmpl-" + HEX32 + ":",  # no number
        "chatcmpl-" + HEX32 + ":-1",  # negative
        "chatcmpl-" + HEX32 + ":+1",
        "chatcmpl-" + HEX32 + ":1.0",
        "chatcmpl-" + HEX32 + ":0x10",
        "chatcmpl-" + HEX32 + ":1e3",
        "chatcmpl-" + HEX32 + ": 1",
        "chatcmpl-" + HEX32 + ":one",
        "chatcmpl-" + HEX32 + ":\u00b2",  # superscript two: str.isdigit() says yes, int() says no
        "chatcmpl-" + HEX32 + ":\u0661\u0662",  # Arabic-Indic digits: not the decimal digits event_id writes
        "chatcmpl-" + HEX32 + ":\uff11",  # fullwidth digit one
        "chatcmpl-" + HEX32 + ":1" + "0" * 12,  # 13 digits: huge
        "chatcmpl-" + HEX32 + ":" + "9" * 400,
        "chatcmpl-" + HEX32.upper() + ":1",
        "cmpl-" + HEX32[:-1] + ":1",
        "msg-" + HEX32 + ":1",
        "1:chatcmpl-" + HEX32,
        "chatcmpl-" + HEX32 + "\n:1",  # a request id with a trailing newline is not a request id
        "chatcmpl-" + HEX32 + ":1:2",
    ],
)
def test_parse_event_id_rejects_malformed_ids(value: str) -> None:
    with pytest.raises(ValueError):
        keys.parse_event_id(value)


def test_parse_event_id_tolerates_surrounding_whitespace_of_a_header() -> None:
    request_id = request_id_with("3")
    assert keys.parse_event_id(f"  {request_id}:5 ") == (request_id, 5)
