"""Unit tests: pure functions and small objects, no processes, no Redis, no network.

Covers the wire format, key naming, event ids, settings parsing, the SSE encoder (checked with a small
parser that follows the WHATWG event-stream rules), chunk rendering and the simulated engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import types
import typing
from typing import Any

import msgpack
import orjson
import pytest
from redis.crc import key_slot

from gateway.chunks import ChunkRenderer, completion_body
from gateway.sse import DONE_FRAME, comment_frame, data_frame, event_frame
from shared import keys, wire
from shared.redis_client import RedisTarget
from shared.settings import (
    CommonSettings,
    GatewaySettings,
    SettingsError,
    WorkerSettings,
    as_environment,
    flag_name,
    known_env_names,
    load_settings,
)
from shared.store import RequestMeta
from worker.engines.base import EngineDelta, EngineError, EngineRequest
from worker.engines.sim import VOCABULARY, SimEngine

HEX32 = "0123456789abcdef" * 2


def request_id_with(first_hex: str, kind: str = "chat") -> str:
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return prefix + first_hex + HEX32[1:]


# -- a spec-following SSE parser (https://html.spec.whatwg.org/multipage/server-sent-events.html) ----------


@dataclasses.dataclass
class ParsedEvent:
    data: str
    last_event_id: str
    type: str


def parse_sse(stream: bytes) -> tuple[list[ParsedEvent], list[str]]:
    """Events and comments of a complete stream, as an ``EventSource`` would see them."""
    text = stream.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = re.split(r"\r\n|\r|\n", text)
    lines.pop()  # whatever follows the last line terminator is an incomplete line: discarded
    events: list[ParsedEvent] = []
    comments: list[str] = []
    data = ""
    event_type = ""
    id_buffer = ""
    last_event_id = ""
    for line in lines:
        if line == "":
            last_event_id = id_buffer
            if data == "":
                event_type = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            events.append(ParsedEvent(data, last_event_id, event_type or "message"))
            data = ""
            event_type = ""
            continue
        if line.startswith(":"):
            comments.append(line[1:])
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data += value + "\n"
        elif name == "id":
            if "\0" not in value:
                id_buffer = value
        elif name == "event":
            event_type = value
        # retry and unknown fields: ignored here
    return events, comments


def test_the_test_parser_follows_the_spec_examples() -> None:
    events, comments = parse_sse(b": hi\r\ndata: YHOO\rdata: +2\ndata\n\nid: 7\ndata:x\n\ndata: dropped")
    assert comments == [" hi"]
    assert [(e.data, e.last_event_id) for e in events] == [("YHOO\n+2\n", ""), ("x", "7")]


# -- wire -----------------------------------------------------------------------------------------------


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


# -- keys -----------------------------------------------------------------------------------------------


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


# -- settings -------------------------------------------------------------------------------------------


def test_settings_defaults_when_nothing_is_given() -> None:
    settings = load_settings(GatewaySettings, {})
    assert settings == GatewaySettings()
    assert settings.port == 8000
    assert settings.heartbeat_s == 15.0
    assert settings.redis_url is None


def test_settings_flag_beats_environment_beats_default() -> None:
    env = {"TOKENSPOOL_PORT": "9001", "TOKENSPOOL_HEARTBEAT_S": "2.5", "TOKENSPOOL_LOG_LEVEL": "debug"}
    from_env = load_settings(GatewaySettings, env)
    assert (from_env.port, from_env.heartbeat_s, from_env.log_level) == (9001, 2.5, "debug")
    assert from_env.max_queue_depth == GatewaySettings().max_queue_depth
    both = load_settings(GatewaySettings, env, {"port": "9002", "heartbeat_s": None})
    assert both.port == 9002  # flag wins
    assert both.heartbeat_s == 2.5  # flag not given (None): environment
    assert both.log_level == "debug"


def test_settings_ignore_variables_that_do_not_start_with_the_prefix() -> None:
    assert load_settings(GatewaySettings, {"PORT": "1", "HOME": "/root", "TOKENSPOOLPORT": "5"}) == GatewaySettings()


def test_settings_of_another_process_kind_are_known_not_unknown() -> None:
    # one environment is shared by gateways and workers: a worker variable must not fail a gateway
    settings = load_settings(GatewaySettings, {"TOKENSPOOL_ENGINE": "vllm", "TOKENSPOOL_MAX_NUM_SEQS": "8"})
    assert settings == GatewaySettings()


def test_settings_worker_id_is_set_by_its_own_flag() -> None:
    assert load_settings(WorkerSettings, {}, {"worker_id": "w-1"}).worker_id == "w-1"
    by_field = {f.name: f for f in dataclasses.fields(WorkerSettings)}
    assert flag_name(by_field["worker_id"]) == "--id"
    assert flag_name(by_field["max_num_seqs"]) == "--max-num-seqs"


@pytest.mark.parametrize(
    ("cls", "name", "raw"),
    [
        (GatewaySettings, "TOKENSPOOL_PORT", "eighty"),
        (GatewaySettings, "TOKENSPOOL_PORT", "80.5"),
        (GatewaySettings, "TOKENSPOOL_PORT", ""),
        (GatewaySettings, "TOKENSPOOL_HEARTBEAT_S", "soon"),
        (GatewaySettings, "TOKENSPOOL_HEARTBEAT_S", "nan"),
        (GatewaySettings, "TOKENSPOOL_HEARTBEAT_S", "inf"),
        (GatewaySettings, "TOKENSPOOL_HEARTBEAT_S", "-inf"),
        (GatewaySettings, "TOKENSPOOL_LOG_LEVEL", "trace"),
        (GatewaySettings, "TOKENSPOOL_LOG_LEVEL", "INFO"),
        (GatewaySettings, "TOKENSPOOL_LOG_FORMAT", "xml"),
        (GatewaySettings, "TOKENSPOOL_FD", "three"),
        (WorkerSettings, "TOKENSPOOL_ENGINE", "tgi"),
        (WorkerSettings, "TOKENSPOOL_ENFORCE_EAGER", "maybe"),
        (WorkerSettings, "TOKENSPOOL_ENFORCE_EAGER", "2"),
        (WorkerSettings, "TOKENSPOOL_MAX_MODEL_LEN", "big"),
        (WorkerSettings, "TOKENSPOOL_GPU_MEMORY_UTILIZATION", "90%"),
        (WorkerSettings, "TOKENSPOOL_ENGINE_CPUS", "first"),
    ],
)
def test_settings_bad_values_raise_naming_the_variable(cls: type[CommonSettings], name: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(name)):
        load_settings(cls, {name: raw})


@pytest.mark.parametrize(
    ("cls", "field", "raw"),
    [
        (GatewaySettings, "port", "x"),
        (GatewaySettings, "heartbeat_s", "nan"),
        (GatewaySettings, "log_level", "loud"),
        (WorkerSettings, "enforce_eager", "perhaps"),
    ],
)
def test_settings_bad_flag_values_raise_naming_the_flag(cls: type[CommonSettings], field: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=re.escape("--" + field.replace("_", "-"))):
        load_settings(cls, {}, {field: raw})


@pytest.mark.parametrize(
    ("cls", "name", "raw"),
    [
        (GatewaySettings, "TOKENSPOOL_PORT", "-1"),
        (GatewaySettings, "TOKENSPOOL_HEARTBEAT_S", "0"),
        (GatewaySettings, "TOKENSPOOL_MAX_BODY_BYTES", "0"),
        (GatewaySettings, "TOKENSPOOL_RETENTION_S", "0"),
        (GatewaySettings, "TOKENSPOOL_RETENTION_S", "-5"),
        (GatewaySettings, "TOKENSPOOL_TOMBSTONE_S", "-0.5"),
        (GatewaySettings, "TOKENSPOOL_WORKER_TTL_S", "0.01"),
        (WorkerSettings, "TOKENSPOOL_MAX_NUM_SEQS", "0"),
        (WorkerSettings, "TOKENSPOOL_MAX_MODEL_LEN", "0"),
        (WorkerSettings, "TOKENSPOOL_SIM_ITL_MS", "-1"),
    ],
)
def test_settings_below_minimum_raise_naming_the_variable(cls: type[CommonSettings], name: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(name)):
        load_settings(cls, {name: raw})


def test_settings_minimum_is_inclusive() -> None:
    settings = load_settings(GatewaySettings, {"TOKENSPOOL_PORT": "0", "TOKENSPOOL_RETENTION_S": "0.001"})
    assert (settings.port, settings.retention_s) == (0, 0.001)


def test_settings_minimum_applies_to_flags_too() -> None:
    with pytest.raises(SettingsError, match="TOKENSPOOL_MAX_NUM_SEQS"):
        load_settings(WorkerSettings, {}, {"max_num_seqs": "0"})


@pytest.mark.parametrize("name", ["TOKENSPOOL_PROT", "TOKENSPOOL_", "TOKENSPOOL_REDIS", "TOKENSPOOL_port"])
def test_settings_unknown_variable_raises_naming_it(name: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(name)):
        load_settings(GatewaySettings, {name: "1"})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("off", False),
    ],
)
def test_settings_booleans(raw: str, expected: bool) -> None:
    assert load_settings(WorkerSettings, {"TOKENSPOOL_ENFORCE_EAGER": raw}).enforce_eager is expected


def test_settings_empty_optional_value_means_unset() -> None:
    settings = load_settings(WorkerSettings, {"TOKENSPOOL_MODEL": "", "TOKENSPOOL_MAX_MODEL_LEN": ""})
    assert settings.model is None
    assert settings.max_model_len is None


def test_settings_every_field_has_a_known_variable() -> None:
    names = known_env_names()
    for cls in (GatewaySettings, WorkerSettings):
        for f in dataclasses.fields(cls):
            assert "TOKENSPOOL_" + f.name.upper() in names


# Values for fields whose text is validated beyond its type; every other field gets a generated value.
_CUSTOM_TEXT = {
    "redis_url": "rediss://u:p@example:6380/2",
    "engine_cpus": "0-1,3",
    "engine_args_json": '{"seed": 1, "x": "a b"}',
    "host": "0.0.0.0",
    "api_keys": "alpha:0123456789abcdef-key,sha256:f84b9046dc1ae19fc4f1b17ef561aa2cdf628fe35fedfcc00d8d09bf5c3a692d",
    "cors_origins": "https://app.example.com,http://localhost:5173",
}


def _non_default(cls: type[CommonSettings]) -> CommonSettings:
    """``cls`` with every field changed from its default, so a round trip exercises every variable."""
    hints = typing.get_type_hints(cls)
    flags: dict[str, str | None] = {}
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        base = args[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) else annotation
        minimum = f.metadata.get("minimum") or 0
        default: Any = f.default
        if f.name in _CUSTOM_TEXT:
            flags[f.name] = _CUSTOM_TEXT[f.name]
        elif typing.get_origin(base) is typing.Literal:
            flags[f.name] = next(str(a) for a in typing.get_args(base) if a != f.default)
        elif base is bool:
            flags[f.name] = "false" if f.default else "true"
        elif base is int:
            flags[f.name] = str(max(int(minimum), (default or 0)) + 3)
        elif base is float:
            flags[f.name] = repr(max(float(minimum), default or 0.0) + 0.3)
        else:
            flags[f.name] = f"custom {f.name} ✓"
    settings = load_settings(cls, {}, flags)
    unchanged = [f.name for f in dataclasses.fields(cls) if getattr(settings, f.name) == f.default]
    assert unchanged == [], f"fields left at their default: {unchanged}"
    return settings


@pytest.mark.parametrize(
    "settings",
    [
        GatewaySettings(),
        WorkerSettings(),
        _non_default(GatewaySettings),
        _non_default(WorkerSettings),
        load_settings(WorkerSettings, {}, {"sim_fail_marker": "  spaced  ", "dtype": "float16", "retention_s": "1e-3"}),
    ],
    ids=["gateway-default", "worker-default", "gateway-custom", "worker-custom", "worker-odd"],
)
def test_as_environment_round_trips_through_load_settings(settings: CommonSettings) -> None:
    env = as_environment(settings)
    assert all(name.startswith("TOKENSPOOL_") for name in env)
    assert all(isinstance(value, str) for value in env.values())
    assert load_settings(type(settings), env) == settings


# -- SSE encoder ----------------------------------------------------------------------------------------

ODD_TEXTS = [
    "plain",
    "",
    " leading space",
    "trailing space ",
    "emoji 👋🏽 family 👨‍👩‍👧 flag 🇳🇴",
    "RTL: مرحبا بالعالم \u202eevil\u202c שלום",
    "line\u2028separator and paragraph\u2029separator",
    "next line \u0085 and vertical tab \x0b form feed \x0c file sep \x1c",
    "tabs\tand\tspaces",
    "data: not a field",
    "id: nor this",
    ": nor a comment",
    "zero width \u200b joiner \u200d bom \ufeff",
    "high plane \U0001d518\U0001d52b\U0001d526 and \U0002070e",
]


def frame_events(frame: bytes) -> list[ParsedEvent]:
    events, comments = parse_sse(frame)
    assert comments == []
    return events


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        (b"one", [b"one"]),
        (b"a\nb", [b"a", b"b"]),
        (b"a\r\nb", [b"a", b"b"]),
        (b"a\rb", [b"a", b"b"]),
        (b"a\r\n\r\nb\n\rc\r\rd", [b"a", b"", b"b", b"", b"c", b"", b"d"]),
        (b"\n", [b"", b""]),
        (b"end\n", [b"end", b""]),
    ],
)
def test_event_frame_writes_one_data_line_per_line(data: bytes, lines: list[bytes]) -> None:
    frame = event_frame("id-1", data)
    assert frame.endswith(b"\n\n")
    body = frame[:-1]  # without the blank line that ends the event
    assert b"\r" not in frame
    out = body.split(b"\n")[:-1]
    assert out[0] == b"id: id-1"
    assert out[1:] == [b"data: " + line for line in lines]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_event_frame_data_and_id_survive_a_spec_parser(text: str) -> None:
    event_id = "chatcmpl-" + HEX32 + ":7 " + text
    frame = event_frame(event_id, text.encode())
    events = frame_events(frame)
    assert len(events) == 1
    assert events[0].data == text
    assert events[0].last_event_id == event_id


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("text", ODD_TEXTS[:8])
def test_event_frame_multiline_data_survives_a_spec_parser(text: str, sep: str) -> None:
    data = f"{text}{sep}second{sep}{sep}{text}"
    events = frame_events(event_frame("x", data.encode()))
    assert len(events) == 1
    assert events[0].data == data.replace(sep, "\n")


@pytest.mark.parametrize("bad_id", ["a\nb", "a\r\nb", "a\rb", "a\0b", "\n\ndata: injected\n\nid: evil", "x\r"])
def test_event_frame_sanitises_ids(bad_id: str) -> None:
    frame = event_frame(bad_id, b"payload")
    assert frame.count(b"\n") == 3  # id line, data line, blank line
    events = frame_events(frame)
    assert len(events) == 1
    assert events[0].data == "payload"
    cleaned = bad_id.replace("\r", "").replace("\n", "").replace("\0", "")
    assert events[0].last_event_id == cleaned


def test_event_frames_concatenate_into_a_stream() -> None:
    stream = b"".join(event_frame(f"r:{i}", f"chunk {i}\nline".encode()) for i in range(1, 4)) + DONE_FRAME
    events, _ = parse_sse(stream)
    assert [(e.last_event_id, e.data) for e in events] == [
        ("r:1", "chunk 1\nline"),
        ("r:2", "chunk 2\nline"),
        ("r:3", "chunk 3\nline"),
        ("r:3", "[DONE]"),  # [DONE] carries no id: the last id stays the resume point
    ]


@pytest.mark.parametrize(
    "text", ["waiting", "a\nb", "a\r\nb", "a\rb", "\n", "\r\n\r\n", "queued: 3 ahead\n\ndata: x", "👋 \u2028"]
)
def test_comment_frame_is_one_line(text: str) -> None:
    frame = comment_frame(text)
    assert frame.startswith(b":")
    assert frame.endswith(b"\n\n")
    inner = frame[:-2]
    assert b"\n" not in inner
    assert b"\r" not in inner
    events, comments = parse_sse(frame)
    assert events == []
    assert len(comments) == 1


@pytest.mark.parametrize(
    "data",
    [
        b'{"error": {"message": "ok"}}',
        b'{"error":\n{"message": "x"}}',
        b'{"error":\r\n{"message": "x"}}',
        b'{"error":\r{"message": "x"}}',
    ],
    ids=["single-line", "lf", "crlf", "cr"],
)
def test_data_frame_is_one_event_whatever_the_line_breaks(data: bytes) -> None:
    events = frame_events(data_frame(data))
    assert len(events) == 1
    assert orjson.loads(events[0].data) == orjson.loads(data)
    assert events[0].last_event_id == ""


def test_done_frame_is_the_openai_terminator() -> None:
    events = frame_events(DONE_FRAME)
    assert [e.data for e in events] == ["[DONE]"]


# -- chunk rendering ------------------------------------------------------------------------------------


def meta(stream_format: str = "chat", include_usage: bool = False, request_id: str | None = None) -> RequestMeta:
    rid = request_id or request_id_with("c", "chat" if stream_format != "completion" else "completion")
    return RequestMeta(
        request_id=rid,
        state="running",
        kind="completion" if stream_format == "completion" else "chat",
        stream_format=stream_format,  # type: ignore[arg-type]
        model="tokenspool-sim",
        owner="anon",
        include_usage=include_usage,
        created_s=1_700_000_000,
        enqueued_ms=1,
        started_ms=2,
        finished_ms=0,
        worker="w",
        attempt=1,
        last_seq=3,
        finish_reason="",
        prompt_tokens=0,
        completion_tokens=0,
        error="",
        cancel_requested=False,
    )


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
    assert all(keys.parse_event_id(e.last_event_id)[0] == request_id for e in events)


def test_chat_rendering_seq_one_carries_the_assistant_role() -> None:
    renderer = ChunkRenderer(meta("chat"))
    first = orjson.loads(renderer.data(1, STREAM_EVENTS[0]) or b"")
    second = orjson.loads(renderer.data(2, STREAM_EVENTS[1]) or b"")
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hello"}
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


# -- simulated engine -----------------------------------------------------------------------------------


def sim_engine(**overrides: str) -> SimEngine:
    return SimEngine(load_settings(WorkerSettings, {}, {"sim_itl_ms": "0", "sim_ttft_ms": "0", **overrides}))


def run_sim(engine: SimEngine, request: EngineRequest) -> list[EngineDelta]:
    async def collect() -> list[EngineDelta]:
        return [delta async for delta in engine.generate(request)]

    return asyncio.run(collect())


def sim_request(
    prompt: str = "Tell me about streams",
    *,
    seed: int | None = 7,
    max_tokens: int | None = None,
    stop: tuple[str, ...] = (),
    emitted: tuple[int, ...] = (),
    kind: str = "completion",
) -> EngineRequest:
    messages = (wire.ChatMessage("user", prompt),) if kind == "chat" else ()
    return EngineRequest(
        request_id=request_id_with("1"),
        kind=kind,
        prompt=prompt if kind == "completion" else "",
        messages=messages,
        sampling=wire.SamplingOptions(max_tokens=max_tokens, seed=seed, stop=stop),
        emitted_token_ids=emitted,
    )


def ids_of(deltas: list[EngineDelta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


def text_of(deltas: list[EngineDelta]) -> str:
    return "".join(delta.text for delta in deltas)


def test_sim_is_deterministic_for_prompt_and_seed() -> None:
    for kind in ("chat", "completion"):
        first = run_sim(sim_engine(), sim_request(kind=kind))
        second = run_sim(sim_engine(), sim_request(kind=kind))
        assert first == second
        assert len(first) >= 1
        assert first[-1].finish_reason == "stop"  # no max_tokens: a natural end
        assert all(d.finish_reason is None for d in first[:-1])
        assert all(len(d.token_ids) == 1 for d in first)
        assert all(d.prompt_tokens == first[0].prompt_tokens >= 1 for d in first)
    base = ids_of(run_sim(sim_engine(), sim_request()))
    assert ids_of(run_sim(sim_engine(), sim_request(seed=8))) != base
    assert ids_of(run_sim(sim_engine(), sim_request("another prompt"))) != base


def test_sim_text_is_words_from_its_vocabulary() -> None:
    deltas = run_sim(sim_engine(), sim_request())
    words = text_of(deltas).split(" ")
    assert words == [VOCABULARY[i] for i in ids_of(deltas)]


def test_sim_natural_length_is_bounded_by_its_default() -> None:
    engine = sim_engine(sim_default_max_tokens="10")
    for seed in range(20):
        deltas = run_sim(engine, sim_request(seed=seed))
        assert 5 <= len(ids_of(deltas)) <= 10
        assert deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 17])
def test_sim_honours_max_tokens_with_finish_reason_length(max_tokens: int) -> None:
    deltas = run_sim(sim_engine(), sim_request(max_tokens=max_tokens))
    assert len(ids_of(deltas)) == max_tokens
    assert deltas[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    # a prefix of the unlimited reply
    full = ids_of(run_sim(sim_engine(), sim_request()))
    assert ids_of(deltas) == full[:max_tokens]


def test_sim_max_tokens_above_its_natural_length_ends_with_stop() -> None:
    deltas = run_sim(sim_engine(sim_default_max_tokens="8"), sim_request(max_tokens=1000))
    assert len(ids_of(deltas)) <= 8
    assert deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize("position", [0, 3, 10])
def test_sim_stops_at_a_stop_string(position: int) -> None:
    full = run_sim(sim_engine(), sim_request(max_tokens=30))
    full_text = text_of(full)
    word = VOCABULARY[ids_of(full)[position]]
    stop = word[1:] if len(word) > 2 else word  # a stop string inside one token
    cut = full_text.find(stop)
    deltas = run_sim(sim_engine(), sim_request(max_tokens=30, stop=("never-generated", stop)))
    assert deltas[-1].finish_reason == "stop"
    assert text_of(deltas) == full_text[:cut]
    assert stop not in text_of(deltas)
    assert len(ids_of(deltas)) <= position + 1


@pytest.mark.parametrize("k", [0, 1, 5, 19, 20])
def test_sim_continuation_yields_exactly_the_remaining_ids(k: int) -> None:
    full = run_sim(sim_engine(), sim_request(max_tokens=20))
    full_ids = ids_of(full)
    rest = run_sim(sim_engine(), sim_request(max_tokens=20, emitted=tuple(full_ids[:k])))
    assert ids_of(rest) == full_ids[k:]
    assert rest[-1].finish_reason == "length"
    if k < len(full_ids):
        assert text_of(full[:k]) + text_of(rest) == text_of(full)


def test_sim_continuation_of_a_natural_end_ends_with_stop() -> None:
    full_ids = ids_of(run_sim(sim_engine(), sim_request()))
    rest = run_sim(sim_engine(), sim_request(emitted=tuple(full_ids)))
    assert ids_of(rest) == []
    assert rest[-1].finish_reason == "stop"


def test_sim_continuation_stops_at_a_stop_string_spanning_the_resume_point() -> None:
    # Uninterrupted, the reply stops at a two-word stop string. An attempt resumed between the two words
    # must stop at the same token, or the resumed stream diverges from the uninterrupted one.
    plain = ids_of(run_sim(sim_engine(), sim_request(max_tokens=30)))
    j = 8
    stop = VOCABULARY[plain[j - 1]] + " " + VOCABULARY[plain[j]]
    uninterrupted = run_sim(sim_engine(), sim_request(max_tokens=30, stop=(stop,)))
    all_ids = ids_of(uninterrupted)
    assert uninterrupted[-1].finish_reason == "stop"
    k = len(all_ids) - 1  # resumed after the first word of the stop string
    resumed = run_sim(sim_engine(), sim_request(max_tokens=30, stop=(stop,), emitted=tuple(all_ids[:k])))
    assert ids_of(resumed) == all_ids[k:]
    assert resumed[-1].finish_reason == "stop"


def test_sim_fail_marker_fails_after_the_first_token() -> None:
    engine = sim_engine(sim_fail_marker="BOOM")
    seen: list[EngineDelta] = []

    async def collect() -> None:
        async for delta in engine.generate(sim_request("please BOOM now", max_tokens=10)):
            seen.append(delta)

    with pytest.raises(EngineError):
        asyncio.run(collect())
    assert len(seen) == 1
    assert engine.running_requests() == 0
    assert len(ids_of(run_sim(engine, sim_request("harmless", max_tokens=10)))) == 10


def test_sim_closing_the_stream_early_frees_its_slot() -> None:
    engine = sim_engine()

    async def take_two() -> int:
        stream = engine.generate(sim_request(max_tokens=50))
        await anext(stream)
        await anext(stream)
        during = engine.running_requests()
        await stream.aclose()  # type: ignore[attr-defined]
        return during

    assert asyncio.run(take_two()) == 1
    assert engine.running_requests() == 0


def test_sim_identity_and_model_name() -> None:
    assert sim_engine().model_name == "tokenspool-sim"
    assert sim_engine(model="m").model_name == "m"
    assert sim_engine(model="m", served_model_name="alias").model_name == "alias"
    engine = sim_engine(max_num_seqs="5")
    assert engine.capacity == 5
    assert "simulated" in engine.owned_by
    assert engine.unsupported == frozenset()


def test_sim_logprobs_are_uniform_and_rendered_as_openai_expects() -> None:
    import math

    engine = sim_engine(sim_itl_ms="0", sim_ttft_ms="0")
    request = EngineRequest("r", "completion", "p", (), wire.SamplingOptions(max_tokens=3, seed=1, logprobs=2))
    deltas = run_sim(engine, request)
    uniform = -math.log(len(VOCABULARY))
    assert [len(d.logprobs) for d in deltas] == [1, 1, 1]
    assert all(d.logprobs[0].logprob == uniform and len(d.logprobs[0].top) == 2 for d in deltas)
    events = [wire.Event("delta", d.text, d.token_ids, logprobs=d.logprobs) for d in deltas]
    assert all(wire.decode(wire.encode(e), wire.Event) == e for e in events)
    offset_events = [
        dataclasses.replace(e, text_offset=sum(len(x.text) for x in events[:i])) for i, e in enumerate(events)
    ]
    body = completion_body(meta("completion"), offset_events, wire.Event("end", finish_reason="length"))
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [d.logprobs[0].token for d in deltas]
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"][1] == len(deltas[0].text)
    chat = completion_body(meta("chat"), offset_events, wire.Event("end", finish_reason="length"))
    content = chat["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == logprobs["tokens"]
    assert all(len(c["top_logprobs"]) == 2 and c["bytes"] == list(c["token"].encode()) for c in content)
    no_logprobs = run_sim(engine, dataclasses.replace(request, sampling=wire.SamplingOptions(max_tokens=3)))
    assert all(d.logprobs == () for d in no_logprobs)


def test_a_full_subscription_buffer_overflows_instead_of_blocking_the_reader() -> None:
    from gateway.relay import Subscription

    async def scenario() -> None:
        sub = Subscription(b"key", 0, cursor=3, limit=2)
        assert sub.push(3, b"old") and sub.items == [], "events at or below the cursor are dropped"
        assert sub.push(4, b"a") and sub.push(5, b"b")
        assert not sub.push(6, b"c"), "a third event overflows a 2-event buffer"
        assert sub.overflowed and sub.items == [] and sub.wake.is_set()

    asyncio.run(scenario())


def test_a_retry_loop_stops_when_cancelled_even_if_the_cancel_arrives_as_a_timeout() -> None:
    from shared.aio import reraise_if_cancelling

    retries = 0

    async def retry_loop() -> None:
        nonlocal retries
        while True:
            try:
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    raise TimeoutError from None  # what a cancel racing a socket timeout can become
            except TimeoutError:
                reraise_if_cancelling()
                retries += 1

    async def scenario() -> None:
        task = asyncio.create_task(retry_loop())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)

    asyncio.run(scenario())
    assert retries == 0, "the loop never saw a real timeout"


@pytest.mark.parametrize(
    ("url", "cluster", "tls"),
    [
        ("redis://127.0.0.1:6379/0", False, False),
        ("rediss://gw:secret@redis.internal:6380/0", False, True),
        ("redis+cluster://10.0.0.1:7000", True, False),
        ("rediss+cluster://gw:secret@10.0.0.1:7000", True, True),
    ],
)
def test_redis_url_scheme_selects_cluster_mode_and_tls(url: str, cluster: bool, tls: bool) -> None:
    target = RedisTarget(url)
    assert (target.cluster, target.tls) == (cluster, tls)
    assert "+cluster" not in target.plain_url and target.plain_url.split("://")[1] == url.split("://")[1]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TOKENSPOOL_REDIS_URL": "http://127.0.0.1:6379"}, "got http://"),
        ({"TOKENSPOOL_REDIS_URL": "127.0.0.1:6379"}, "redis+cluster://"),
        ({"TOKENSPOOL_REDIS_URL": "redis://h:1", "TOKENSPOOL_REDIS_TLS_CA_FILE": "/ca.pem"}, "not rediss://"),
    ],
)
def test_settings_refuse_a_redis_url_that_cannot_work(environ: dict[str, str], message: str) -> None:
    for cls in (GatewaySettings, WorkerSettings):
        with pytest.raises(SettingsError, match=re.escape(message)) as raised:
            load_settings(cls, environ)
        assert "TOKENSPOOL_REDIS_URL" in str(raised.value)


def test_redis_target_never_shows_the_password_in_its_errors() -> None:
    with pytest.raises(ValueError) as raised:
        RedisTarget("redis+sentinel://gw:hunter2@h:1")
    assert "hunter2" not in str(raised.value) and "gw:***@h:1" in str(raised.value)


@pytest.mark.parametrize("cls", [CommonSettings, GatewaySettings, WorkerSettings])
def test_every_process_refuses_a_redis_url_it_cannot_use(cls: type[CommonSettings]) -> None:
    with pytest.raises(SettingsError, match="expected a redis://"):
        load_settings(cls, {"TOKENSPOOL_REDIS_URL": "http://127.0.0.1:6379"})
    with pytest.raises(SettingsError, match="not rediss://"):
        load_settings(cls, {"TOKENSPOOL_REDIS_URL": "redis://127.0.0.1:6379", "TOKENSPOOL_REDIS_TLS_CA_FILE": "ca.pem"})


def test_a_job_encodes_exactly_as_its_fields_as_nested_lists() -> None:
    """The encoder walks the dataclasses itself (no deep copies); the bytes are those of the plain lists."""
    import dataclasses

    import msgpack

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

    reference = [as_lists(value) for value in dataclasses.astuple(job)]
    version, _tag, *fields = msgpack.unpackb(wire.encode(job), raw=False)
    assert version == wire.WIRE_VERSION and fields == reference
    assert wire.decode(wire.encode(job), wire.Job) == job
