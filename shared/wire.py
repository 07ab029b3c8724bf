"""The wire format: every payload tokenspool stores in Redis, as versioned msgpack.

One pair of functions, :func:`encode` and :func:`decode`, is the only place payloads are built or
read. Each payload is a msgpack array ``[version, tag, *fields]``: positional fields keep a retained
token event small (tens of bytes), and the version lets a later release read what an older one wrote.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass
from dataclasses import fields as dataclass_fields
from typing import Any, Final, Literal, TypeVar

import msgpack

WIRE_VERSION: Final = 1

EventKind = Literal["delta", "end", "error", "handover"]
TERMINAL_KINDS: Final = frozenset({"end", "error"})
"""The kinds of event that end a request's stream: nothing is appended after one."""
FinishReason = Literal["stop", "length"]
WorkerState = Literal["active", "draining", "stopped"]


class WireError(ValueError):
    """A payload that is not tokenspool wire data of a version this code reads."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """The OpenAI sampling parameters a request carries; ``None`` leaves the engine's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    """Return log probabilities with this many alternatives per token (0: the sampled token's only)."""


@dataclass(frozen=True, slots=True)
class Job:
    """What a worker needs to run a request: enqueued on the model's queue and kept beside its events."""

    request_id: str
    kind: Literal["chat", "completion"]
    model: str
    prompt: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingOptions
    created_s: int
    enqueued_ms: int
    background: bool = False
    """Runs to the end even when no client stays attached."""
    body: bytes = b""
    """The OpenAI request's JSON as the client sent it (less tokenspool's own fields): a vLLM worker renders
    it with vLLM's own protocol classes and renderer; the fields above are what the simulated engine reads."""
    response: bytes = b""
    """For a Responses API request (``POST /v1/responses``): that request's JSON as the gateway accepted it,
    from which any gateway renders the response object (``body`` is the chat request it was mapped to, which
    is what workers run). Empty for every other request."""
    continuous_usage: bool = False
    """The client asked for usage on every chunk (``stream_options.continuous_usage_stats``): the worker then
    stores, on each delta, the prompt's tokens and its choice's tokens so far. Written only when set, so a
    plain job's bytes (and what an older worker reads) are as before."""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's text and log probability, with the most likely alternatives at that position."""

    token: str
    logprob: float | None
    """None only for a prompt's first token (echoed with its prompt's logprobs: nothing precedes it)."""
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Event:
    """One stored event of a request's stream.

    ``delta`` carries new text and its token ids (and, on the last one, why generation stopped);
    ``end`` closes a stream that finished, with its usage; ``error`` closes one that failed or was
    cancelled (``error_type`` says which); ``handover`` marks where another worker continued the
    request (shown to clients as an SSE comment only).
    """

    kind: EventKind
    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_type: str = ""
    message: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    """One entry per token id, when the request asked for log probabilities."""
    text_offset: int = 0
    """Characters its choice's logprob tokens spelled before this event (completions' ``text_offset``, counted
    as vLLM counts it)."""
    index: int = 0
    """The choice this delta belongs to (``n > 1``)."""
    reasoning: str = ""
    """Reasoning text of this delta, as vLLM's reasoning parser split it from the content (``text``)."""
    tool_calls: str = ""
    """The delta's tool-call pieces as vLLM's tool parser streams them: a JSON array of OpenAI
    ``delta.tool_calls`` entries, stored as rendered (empty: none)."""
    answer: str = ""
    """On a choice's last delta, when vLLM's parsers read the output: the choice as ``vllm serve`` answers a
    request that is not streamed (JSON: ``content``, ``reasoning``, ``tool_calls``, ``finish_reason``), which
    vLLM builds by parsing the whole output again and which the streamed pieces do not always add up to."""
    reasoning_tokens: int | None = None
    """When the worker's vLLM has a reasoning parser, on ``end``: the reasoning tokens of every choice, which
    vLLM's usage reports as ``completion_tokens_details`` (None: no details, as vLLM without one); on each
    delta of a request with usage on every chunk: its choice's reasoning tokens so far."""
    prompt_token_ids: tuple[int, ...] = ()
    """The prompt's token ids, on each choice's first delta of a request that asked for them
    (``return_token_ids``) or of a completion that echoes its prompt: the gateway shows them where vLLM's
    servers do."""
    param: str = ""
    """On ``error``: the request parameter the refusal names, as ``vllm serve``'s error body names it (its
    ``param``; empty: none)."""

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker registers and refreshes on every heartbeat."""

    worker_id: str
    model: str
    engine: str
    capacity: int
    running: int
    state: WorkerState
    host: str
    pid: int
    started_ms: int
    heartbeat_ms: int
    owned_by: str = field(default="tokenspool")
    max_model_len: int = 0
    """Context length in tokens (0: the engine has no limit)."""
    unsupported: tuple[str, ...] = ()
    """Request parameters this worker's engine cannot honour; the gateway refuses them with a 400."""
    engine_running: int = 0
    """Requests the engine itself reports as unfinished (vLLM's own count)."""


Payload = Job | Event | WorkerInfo
_TAGS: Final[dict[type[Any], int]] = {Job: 1, Event: 2, WorkerInfo: 3}
P = TypeVar("P", Job, Event, WorkerInfo)


def _plain(value: Any) -> Any:
    """Tuples and nested dataclasses as lists: what ``astuple`` then tuple-to-list gives, without the deep
    copies ``astuple`` makes (which cost a gateway ~0.1 ms per submitted job)."""
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if is_dataclass(value) and not isinstance(value, type):
        return [_plain(getattr(value, f.name)) for f in dataclass_fields(value)]
    return value


def _first_path(value: Any, bad: Callable[[Any], bool], path: str = "") -> str | None:
    """The path (``messages.0.content``) of the first leaf of ``value`` (nested dicts, lists and tuples, as a
    request is decoded from JSON; keys count as leaves) for which ``bad`` is true, or None."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return (path or "(body)") if bad(value) else None
    for key, item in items:
        found = _first_path(key, bad, path) or _first_path(item, bad, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _not_utf8(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _beyond_64_bits(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64


def carries(value: Any) -> bool:
    """Whether the wire format carries ``value`` (decoded JSON) as it is: msgpack packs it, so it holds no
    text without a UTF-8 form and no integer beyond 64 bits. A C call, a twentieth of walking the value in
    Python; only a value it refuses is walked (:func:`unencodable_text`, :func:`unencodable_integer`) to
    name the field at fault."""
    try:
        msgpack.packb(value, use_bin_type=True)
    except (UnicodeEncodeError, OverflowError, TypeError, ValueError):
        return False
    return True


def unencodable_text(value: Any, path: str = "") -> str | None:
    """The path of the first text in ``value`` that the wire format cannot carry, or None when it has none.

    Text is stored as UTF-8, and a lone UTF-16 surrogate (``"\\ud800"`` in JSON, which Python's decoder
    accepts) has no UTF-8 form: a request carrying one must be refused where it arrives, with the field
    named, before anything is held or written for it, not fail when it is encoded."""
    return _first_path(value, _not_utf8, path)


def unencodable_integer(value: Any, path: str = "") -> str | None:
    """The path of the first integer in ``value`` beyond 64 bits (JSON has no limit; msgpack and the JSON
    stored for a worker do), or None: refused where it arrives, like bad text."""
    return _first_path(value, _beyond_64_bits, path)


def encode(payload: Payload) -> bytes:
    """Serialise a payload; the single writer of tokenspool's stored bytes."""
    tag = _TAGS[type(payload)]
    if isinstance(payload, Event):
        fields: list[Any] = [
            payload.kind,
            payload.text,
            list(payload.token_ids),
            payload.finish_reason,
            payload.prompt_tokens,
            payload.completion_tokens,
            payload.error_type,
            payload.message,
        ]
        # Optional fields follow in a fixed order, each written only when it or a later one is set, so a
        # plain text delta is exactly as small as before they existed.
        optional: list[Any] = [
            [[lp.token, lp.logprob, [list(alt) for alt in lp.top]] for lp in payload.logprobs],
            payload.text_offset,
            payload.index,
            payload.reasoning,
            payload.tool_calls,
            payload.answer,
            0 if payload.reasoning_tokens is None else payload.reasoning_tokens + 1,  # 0 (dropped): None
            list(payload.prompt_token_ids),
            payload.param,
        ]
        while optional and not optional[-1]:
            optional.pop()
        fields += optional
    else:
        fields = [_plain(getattr(payload, f.name)) for f in dataclass_fields(payload)]
        if isinstance(payload, Job) and not payload.continuous_usage:
            fields.pop()
    packed: bytes = msgpack.packb([WIRE_VERSION, tag, *fields], use_bin_type=True)
    return packed


_EVENT_HEAD: Final = msgpack.packb(WIRE_VERSION) + msgpack.packb(_TAGS[Event])
"""The version and tag that open every event's fields (one byte each)."""
_TERMINAL_KIND_BYTES: Final = tuple(msgpack.packb(kind) for kind in sorted(TERMINAL_KINDS))


def is_terminal(data: bytes) -> bool:
    """Whether a stored event ends its request's stream (``end`` or ``error``), read from its first bytes:
    the relay asks it of every stream's last event on every read. An event as :func:`encode` writes it is an
    array (header of one byte, or three past 15 fields), the version and tag, then the kind as a short
    string; anything else is read with msgpack."""
    start = 3 if data[:1] and 0x90 <= data[0] <= 0x9F else 5 if data[:1] == b"\xdc" else 0
    if start and data[start - 2 : start] == _EVENT_HEAD and b"\xa0" <= data[start : start + 1] <= b"\xbf":
        return data.startswith(_TERMINAL_KIND_BYTES, start)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    try:
        unpacker.read_array_header()
        unpacker.skip()  # the version
        unpacker.skip()  # the tag
        kind = unpacker.unpack()
    except (ValueError, msgpack.OutOfData, msgpack.FormatError, msgpack.StackError) as exc:
        raise WireError(f"undecodable payload: {exc}") from exc
    return kind in TERMINAL_KINDS


def decode(data: bytes, kind: type[P]) -> P:
    """Read a payload of the expected type; :class:`WireError` on anything else."""
    try:
        items = msgpack.unpackb(data, raw=False, use_list=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise WireError(f"undecodable payload: {exc}") from exc
    if not isinstance(items, list) or len(items) < 2:
        raise WireError("payload is not a versioned array")
    version, tag, *fields = items
    if version != WIRE_VERSION:
        raise WireError(f"wire version {version!r} is not readable by this release (reads {WIRE_VERSION})")
    if tag != _TAGS[kind]:
        raise WireError(f"expected a {kind.__name__} payload, got tag {tag!r}")
    try:
        if kind is Event:
            (ev_kind, text, token_ids, finish_reason, prompt_tokens, completion_tokens, error_type, message, *extra) = (
                fields
            )
            logprobs = tuple(
                TokenLogprob(token, logprob, tuple((alt, alt_lp) for alt, alt_lp in top))
                for token, logprob, top in (extra[0] if extra else ())
            )
            event = Event(
                ev_kind,
                text,
                tuple(token_ids),
                finish_reason,
                prompt_tokens,
                completion_tokens,
                error_type,
                message,
                logprobs,
                *extra[1:6],
            )
            if len(extra) > 6 and extra[6]:
                event = dataclasses.replace(event, reasoning_tokens=extra[6] - 1)
            if len(extra) > 7:
                event = dataclasses.replace(event, prompt_token_ids=tuple(extra[7]))
            if len(extra) > 8:
                event = dataclasses.replace(event, param=extra[8])
            return event  # type: ignore[return-value]
        if kind is Job:
            request_id, job_kind, model, prompt, messages, sampling, created_s, enqueued_ms = fields[:8]
            job_extra: list[Any] = list(fields[8:])
            sampling_fields: list[Any] = list(sampling)
            max_tokens, temperature, top_p, seed, stop = sampling_fields[:5]
            rest = sampling_fields[5:]
            if len(rest) >= 7:
                rest[6] = tuple(rest[6])  # stop_token_ids
            job = Job(
                request_id,
                job_kind,
                model,
                prompt,
                tuple(ChatMessage(role, content) for role, content in messages),
                SamplingOptions(max_tokens, temperature, top_p, seed, tuple(stop), *rest),
                created_s,
                enqueued_ms,
                *job_extra,
            )
            return job  # type: ignore[return-value]
        info = WorkerInfo(*fields)
        return dataclasses.replace(info, unsupported=tuple(info.unsupported))  # type: ignore[return-value]
    except (TypeError, ValueError) as exc:
        raise WireError(f"malformed {kind.__name__} payload: {exc}") from exc
