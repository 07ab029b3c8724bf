"""The transport-free half of the tokenspool client: errors, result types, the SSE decoder, the per-stream
state that checks continuity, and the retry policy. ``tokenspool.client`` drives it with httpx, once with
asyncio and once blocking, so both clients agree on every rule by construction."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import httpx
import orjson

from tokenspool.shared import handover, keys

RESUMABLE_STREAM_ERRORS: Final = frozenset({"inter_token_timeout", "redis_unavailable"})
"""Error frames (without an event id) a gateway sends when *its connection* cannot go on while the request
does: the client resumes instead of raising. Any other error ends the stream with an exception."""

RETRYABLE_STATUS: Final = frozenset({429, 502, 503, 504})
"""Answers that say "not now" rather than "not this": queue full, Redis down, a proxy without an upstream."""

DEFAULT_MAX_EVENT_BYTES: Final = 8 * 1024 * 1024


# -- errors ----------------------------------------------------------------------------------------------


class TokenspoolError(Exception):
    """Everything the client raises on purpose. ``status`` is the HTTP status when a gateway answered with
    one; ``code`` and ``error_type`` come from the OpenAI error body or the in-stream error event."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        error_type: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.error_type = error_type
        self.param = param
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [str(self.status)] if self.status is not None else []
        if self.code:
            parts.append(self.code)
        prefix = f"[{' '.join(parts)}] " if parts else ""
        return prefix + self.message


class APIStatusError(TokenspoolError):
    """A gateway answered with an HTTP error (an OpenAI error body)."""

    retry_after_s: float | None = None


class BadRequestError(APIStatusError):
    """400: a parameter the gateway refuses, or a resume position this request never had."""


class AuthenticationError(APIStatusError):
    """401: the gateway has API keys and this client sent none it knows (``api_key=``)."""


class NotFoundError(APIStatusError):
    """404: unknown model or request (or a request whose tombstone expired too, or another key's request)."""


class ConflictError(APIStatusError):
    """409: e.g. cancelling a request that already ended."""


class GoneError(APIStatusError):
    """410: the request exists but the events still needed have expired."""


class UnprocessableError(APIStatusError):
    """422: an Idempotency-Key reused with another body."""


class RateLimitError(APIStatusError):
    """429: the model's queue is full (retried within the backoff before this is raised)."""


class ServerError(APIStatusError):
    """5xx: e.g. 503 while Redis is unreachable (retried within the backoff before this is raised)."""


_BY_STATUS: Final[dict[int, type[APIStatusError]]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    410: GoneError,
    422: UnprocessableError,
    429: RateLimitError,
}


class StreamError(TokenspoolError):
    """The stream carried an error event: the request failed (engine error, deadline, given up, ...)."""


class RequestCancelledError(StreamError):
    """The request was cancelled (``DELETE``, or by the gateway after every client left)."""


class StreamGapError(TokenspoolError):
    """An event arrived out of sequence: raised instead of silently skipping or repeating tokens."""


class ProtocolError(TokenspoolError):
    """The gateway said something this client does not understand (not SSE, no request id, ...)."""


class ConnectionFailedError(TokenspoolError):
    """Every attempt within the backoff failed to reach a gateway (or to get an event); ``__cause__`` is
    the last failure."""


def error_from_response(response: httpx.Response, request_id: str | None = None) -> APIStatusError:
    """The typed error of a gateway's (already read) HTTP error answer."""
    status = response.status_code
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIStatusError)
    message, code, error_type, param = f"HTTP {status}", None, None, None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or message)
        code = _str_or_none(error.get("code"))
        error_type = _str_or_none(error.get("type"))
        param = _str_or_none(error.get("param"))
    elif response.content:
        message = f"HTTP {status}: {response.content[:200].decode(errors='replace')}"
    exc = cls(message, status=status, code=code, error_type=error_type, param=param, request_id=request_id)
    exc.retry_after_s = retry_after_s(response.headers.get("retry-after"))
    return exc


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` as seconds (it may be a number or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# -- results ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def parse(cls, body: object) -> Usage | None:
        if not isinstance(body, dict):
            return None
        prompt, completion = int(body.get("prompt_tokens", 0)), int(body.get("completion_tokens", 0))
        return cls(prompt, completion, int(body.get("total_tokens", prompt + completion)))


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One SSE event of a request, as the gateway sent it (``chunk`` is its parsed ``data:`` JSON)."""

    request_id: str
    event_id: str
    seq: int
    text: str
    """The delta's text (chat ``delta.content``, completion ``text``, simple form ``token``); "" if none."""
    finish_reason: str | None
    usage: Usage | None
    """Set on the final usage chunk (the client asks for ``stream_options.include_usage`` by default)."""
    chunk: dict[str, Any]
    index: int = 0
    """The choice this delta belongs to (``n > 1``)."""
    reasoning: str = ""
    """The delta's reasoning text (``delta.reasoning``, with a reasoning parser)."""
    tool_calls: tuple[dict[str, Any], ...] = ()
    """The delta's tool-call pieces as OpenAI streams them (``delta.tool_calls``: index, then id, type and
    name on a call's first piece, then more of its ``function.arguments``)."""


@dataclass(frozen=True, slots=True)
class RequestStatus:
    """``GET /v1/requests/{id}``."""

    request_id: str
    state: str
    """queued, running, done, cancelled or failed."""
    model: str
    events: int
    worker: str | None
    attempt: int
    finish_reason: str | None
    usage: Usage | None
    error: str | None
    cancel_requested: bool
    raw: dict[str, Any]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> RequestStatus:
        return cls(
            request_id=str(body["id"]),
            state=str(body["state"]),
            model=str(body.get("model", "")),
            events=int(body.get("events") or 0),
            worker=body.get("worker"),
            attempt=int(body.get("attempt") or 0),
            finish_reason=body.get("finish_reason"),
            usage=Usage.parse(body.get("usage")),
            error=body.get("error"),
            cancel_requested=bool(body.get("cancel_requested")),
            raw=body,
        )

    @property
    def terminal(self) -> bool:
        return self.state in ("done", "cancelled", "failed")


@dataclass(frozen=True, slots=True)
class CancelResult:
    """``DELETE /v1/requests/{id}``: ``cancelled`` at once (it was queued) or ``cancelling`` (it was
    running; it stops within one engine step and its stream ends with a cancelled error)."""

    request_id: str
    state: str


# -- retry policy ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` (1-based) waits uniformly in
    ``[0, min(cap_s, base_s * 2**(n-1))]``, or at least the gateway's ``Retry-After``. ``max_attempts``
    consecutive failures without a new event end the stream with the last error."""

    base_s: float = 0.2
    cap_s: float = 10.0
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.cap_s < 0:
            raise ValueError("backoff base_s and cap_s must be >= 0")
        if self.max_attempts < 1:
            raise ValueError("backoff max_attempts must be >= 1")

    def delay_s(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        jittered = rng.uniform(0.0, min(self.cap_s, self.base_s * 2.0 ** min(attempt - 1, 60)))
        return max(jittered, retry_after or 0.0)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why an attempt did not go on: a transport error, a retryable HTTP answer, or a resumable drop."""

    error: BaseException
    retry_after_s: float | None = None


class Gateways:
    """The base URLs, tried round-robin: a failure moves every later call to the next gateway."""

    def __init__(self, base_url: str | Sequence[str]) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("at least one gateway base URL is required")
        self.urls = [normalize_base_url(url) for url in urls]
        self._index = 0

    def url(self, path: str) -> str:
        return self.urls[self._index % len(self.urls)] + path

    def advance(self) -> None:
        self._index = (self._index + 1) % len(self.urls)


def normalize_base_url(url: str) -> str:
    """A gateway's root; an OpenAI-style ``.../v1`` base is accepted too."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"not an http(s) gateway URL: {url!r}")
    return url.rstrip("/").removesuffix("/v1")


def give_up(failure: Failure, attempts: int, request_id: str | None) -> TokenspoolError:
    """The error to raise after ``attempts`` consecutive failures: the gateway's own answer if it gave one
    (a 429 or 503 keeps its status and code), else a :class:`ConnectionFailedError` that says what broke."""
    if isinstance(failure.error, APIStatusError):
        return failure.error
    where = f" for request {request_id}" if request_id else ""
    return ConnectionFailedError(
        f"gave up after {attempts} failed attempt(s){where}; the last: {type(failure.error).__name__}: {failure.error}",
        request_id=request_id,
    )


# -- SSE -------------------------------------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: building a frozen one costs ~0.2 µs more, once per event per reader
class SSEMessage:
    id: str | None
    """This frame's own ``id:`` (None for the gateway's id-less error frames, ``[DONE]`` after a frame with the
    terminal event's id, and every frame of a stream that has none)."""
    data: str
    raw: bytes = b""
    """The whole frame as it arrived, blank line included: kept only by a decoder made with ``keep_raw``
    (tests compare a replay with the live stream byte for byte)."""

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass(slots=True)
class SSEComment:
    text: str


class SSEDecoder:
    """Incremental ``text/event-stream`` decoder: the one every reader of tokenspool's streams uses (the
    client, the benchmark's raw-socket client, ``bench-vllm``, the soak test, the tests). Unlike a browser's
    EventSource, an id belongs to its own frame only (a frame without ``id:`` has none): that is what the
    continuity check needs. A frame larger than ``max_event_bytes`` is a protocol error, so a broken peer
    cannot grow the buffer without bound.

    It splits whole frames (on the blank line) and decodes an event's id and data once, when it is
    complete: the benchmark client reads every frame of every stream with it, so its cost per event is the
    client's cost per event (a microsecond or two)."""

    __slots__ = ("_buffer", "_keep_raw", "_max")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, *, keep_raw: bool = False) -> None:
        self._max = max_event_bytes
        self._keep_raw = keep_raw
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SSEMessage | SSEComment]:
        """The events and comments completed by ``chunk``, in the order they arrived."""
        text = self._buffer + chunk if self._buffer else chunk
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n")  # a "\r" ending this chunk waits in the buffer for its "\n"
        frames = text.split(b"\n\n")
        self._buffer = frames.pop()
        if len(self._buffer) > self._max:
            raise ProtocolError(f"an SSE event exceeds {self._max} bytes")
        out: list[SSEMessage | SSEComment] = []
        for frame in frames:
            if frame[:4] == b"id: ":  # the fast path: a gateway's event frame, one id line and one data line
                id_line, separator, data_line = frame.partition(b"\ndata: ")
                if separator and b"\n" not in data_line and b"\n" not in id_line and b"\0" not in id_line:
                    raw = frame + b"\n\n" if self._keep_raw else b""
                    out.append(
                        SSEMessage(id_line[4:].decode("utf-8", "replace"), data_line.decode("utf-8", "replace"), raw)
                    )
                    continue
            data: bytes | None = None
            event_id: bytes | None = None
            for line in frame.split(b"\n"):
                if line.startswith(b"data:"):
                    value = line[6:] if line[5:6] == b" " else line[5:]
                    data = value if data is None else data + b"\n" + value
                elif line.startswith(b"id:"):
                    value = line[4:] if line[3:4] == b" " else line[3:]
                    if b"\0" not in value:
                        event_id = value
                elif line.startswith(b":"):
                    out.append(SSEComment(line[1:].removeprefix(b" ").decode("utf-8", "replace")))
            if data is not None:
                out.append(
                    SSEMessage(
                        None if event_id is None else event_id.decode("utf-8", "replace"),
                        data.decode("utf-8", "replace"),
                        frame + b"\n\n" if self._keep_raw else b"",
                    )
                )
        return out


# -- one stream's state ----------------------------------------------------------------------------------


class Finished:
    """``[DONE]``: the stream is complete."""


FINISHED: Final = Finished()


@dataclass(frozen=True, slots=True)
class Resume:
    """The gateway closed this connection while the request goes on: resume after the last event."""

    reason: str


class StreamState:
    """Where a stream is (request id, last event) and the rules for what may come next: each event must
    name this request and be exactly the next sequence number, allowing one skipped number per worker
    handover announced since the last event."""

    def __init__(self, request_id: str | None = None, last_event_id: str | None = None) -> None:
        self.request_id = request_id
        self.last_event_id: str | None = None
        self.last_seq = 0
        if last_event_id:
            try:
                named, seq = keys.parse_event_id(last_event_id)
            except ValueError:
                raise ValueError(f"not a tokenspool event id: {last_event_id!r}") from None
            if request_id is not None and named != request_id:
                raise ValueError(f"event id {last_event_id!r} belongs to request {named}, not {request_id}")
            self.request_id, self.last_event_id, self.last_seq = named, last_event_id, seq
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self._handovers = 0

    def connected(self, response: httpx.Response) -> None:
        """A connection answered 200: check it is an event stream of this request; replay starts anew."""
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            raise ProtocolError(f"expected an event stream, got {content_type or 'no content type'!r}")
        answered = response.headers.get("x-request-id")
        if self.request_id is None:
            if not answered or not keys.is_request_id(answered):
                raise ProtocolError(f"the gateway's answer names no request (X-Request-Id {answered!r})")
            self.request_id = answered
        elif answered is not None and answered != self.request_id:
            raise ProtocolError(f"asked for request {self.request_id}, the gateway answered for {answered}")
        self._handovers = 0

    def handle(self, item: SSEMessage | SSEComment) -> StreamEvent | Finished | Resume | None:
        if isinstance(item, SSEComment):
            # A worker handover is stored as an event of its own but shown only as a comment: the next
            # event id skips one sequence number per handover, and the continuity check allows exactly that.
            if handover.parse_comment(item.text) is not None:
                self._handovers += 1
            return None
        if item.id is None:
            return self._without_id(item.data)
        request_id, seq = self._check_sequence(item.id)
        if item.data == "[DONE]":  # it carries the id of a terminal event that had no frame of its own
            self.last_seq, self.last_event_id, self._handovers = seq, item.id, 0
            return FINISHED
        try:
            chunk = orjson.loads(item.data)
        except orjson.JSONDecodeError:
            raise ProtocolError(f"event {item.id}: data is not JSON: {item.data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise ProtocolError(f"event {item.id}: data is not a JSON object")
        self.last_seq, self.last_event_id, self._handovers = seq, item.id, 0
        if isinstance(chunk.get("error"), dict):
            raise self._stream_error(chunk["error"])
        event = _event(request_id, item.id, seq, chunk)
        if event.finish_reason:
            self.finish_reason = event.finish_reason
        if event.usage is not None:
            self.usage = event.usage
        return event

    def _without_id(self, data: str) -> Finished | Resume | None:
        if data == "[DONE]":
            return FINISHED
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(body, dict) and error is None and self.last_seq == 0 and "choices" in body:
            return None  # a chat stream's opening role chunk (one per choice): no text, no position
        if not isinstance(error, dict):
            raise ProtocolError(f"an event without an id that is neither [DONE] nor an error: {data[:200]!r}")
        if error.get("type") in RESUMABLE_STREAM_ERRORS:
            return Resume(f"{error.get('type')}: {error.get('message')}")
        raise self._stream_error(error)

    def _check_sequence(self, event_id: str) -> tuple[str, int]:
        try:
            request_id, seq = keys.parse_event_id(event_id)
        except ValueError:
            raise ProtocolError(f"not a tokenspool event id: {event_id!r}") from None
        if request_id != self.request_id:
            raise StreamGapError(
                f"event {event_id!r} belongs to another request than {self.request_id}", request_id=self.request_id
            )
        expected = self.last_seq + 1 + self._handovers
        if seq != expected:
            what = "a repeated" if seq <= self.last_seq else "a gap: an"
            raise StreamGapError(
                f"{what} event {seq} after event {self.last_seq} of request {request_id} (expected {expected})",
                request_id=request_id,
            )
        return request_id, seq

    def _stream_error(self, error: Mapping[str, Any]) -> StreamError:
        error_type = _str_or_none(error.get("type")) or "error"
        cls = RequestCancelledError if error_type == "cancelled" else StreamError
        return cls(
            str(error.get("message") or error_type),
            code=_str_or_none(error.get("code")) or error_type,
            error_type=error_type,
            request_id=self.request_id,
        )


def _event(request_id: str, event_id: str, seq: int, chunk: dict[str, Any]) -> StreamEvent:
    text, finish_reason, index, reasoning = "", None, 0, ""
    tool_calls: tuple[dict[str, Any], ...] = ()
    choices = chunk.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        delta = choice.get("delta")
        text = (delta.get("content") if isinstance(delta, dict) else choice.get("text")) or ""
        finish_reason = choice.get("finish_reason")
        raw_index = choice.get("index")
        index = raw_index if isinstance(raw_index, int) else 0
        if isinstance(delta, dict):
            reasoning = str(delta.get("reasoning") or "")
            calls = delta.get("tool_calls")
            tool_calls = tuple(c for c in calls if isinstance(c, dict)) if isinstance(calls, list) else ()
    elif "token" in chunk:  # the simple GET form, when attaching to a request created through it
        text = str(chunk.get("token") or "")
        finish_reason = chunk.get("finish_reason")
    usage = Usage.parse(chunk.get("usage"))
    return StreamEvent(request_id, event_id, seq, str(text), finish_reason, usage, chunk, index, reasoning, tool_calls)


def chat_body(messages: Sequence[Mapping[str, Any]], model: str, params: Mapping[str, Any]) -> dict[str, Any]:
    return _body(model, params, messages=[dict(m) for m in messages])


Prompt = str | list[str] | list[int] | list[list[int]]
"""A completion's prompt: a text, token ids, or a list of either (each prompt's choices are numbered on)."""


def completion_body(prompt: Prompt, model: str, params: Mapping[str, Any]) -> dict[str, Any]:
    return _body(model, params, prompt=prompt)


def _body(model: str, params: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    if params.get("stream", True) is not True:
        raise ValueError("the tokenspool client streams; use the gateway's non-streaming API for stream=false")
    body: dict[str, Any] = {"model": model, **fields, **params, "stream": True}
    body.setdefault("stream_options", {"include_usage": True})
    return body


def auth_headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    """The headers every call of a client carries: its own, plus ``Authorization: Bearer`` for its key."""
    out = dict(headers or {})
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    return out
