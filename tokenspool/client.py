"""A Python client for tokenspool gateways that makes a stream survive the network.

``stream_chat`` / ``stream_completion`` submit with an ``Idempotency-Key`` (so a POST retried after its
answer was lost maps onto the request it created instead of starting a second one), then yield typed events.
When a connection breaks — a reset, a read error, a killed gateway, a proxy that cut it, a stream silent for
``inter_token_timeout_s`` — the client reconnects to ``GET /v1/requests/{id}/events`` with ``Last-Event-ID``
(the next gateway of its list first), with exponential backoff and full jitter, and goes on yielding: nothing
lost, nothing twice, and every event is checked to be exactly the next one.

What counts as alive: any bytes, SSE comments included. Gateways send ``: ping`` every ``heartbeat_s``
(15 s) on an idle stream and ``: queued …`` every second while a request waits, so a silent connection is a
dead one, and a reconnect is what fixes it; a slow model is not (a reconnect would not make it faster). Keep
``inter_token_timeout_s`` above the gateways' heartbeat. A request that runs but emits nothing is the
gateway's to notice: it ends the connection with an ``inter_token_timeout`` error frame after its own
timeout (60 s), and the client resumes from there.

Usage::

    async with AsyncClient(["http://gw-a:8000", "http://gw-b:8000"]) as client:
        async with client.stream_chat([{"role": "user", "content": "Hi"}], model="tokenspool-sim") as stream:
            async for event in stream:
                print(event.text, end="")
        print(stream.finish_reason, stream.usage, stream.resumes)
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeVar

import httpx

from tokenspool.client_core import (
    DEFAULT_MAX_EVENT_BYTES,
    FINISHED,
    RETRYABLE_STATUS,
    APIStatusError,
    AuthenticationError,
    Backoff,
    BadRequestError,
    CancelResult,
    ConflictError,
    ConnectionFailedError,
    Failure,
    Gateways,
    GoneError,
    NotFoundError,
    Prompt,
    ProtocolError,
    RateLimitError,
    RequestCancelledError,
    RequestStatus,
    Resume,
    ServerError,
    SSEDecoder,
    StreamError,
    StreamEvent,
    StreamGapError,
    StreamState,
    TokenspoolError,
    UnprocessableError,
    Usage,
    auth_headers,
    chat_body,
    completion_body,
    error_from_response,
    give_up,
)
from tokenspool.shared import keys
from tokenspool.shared.aio import reraise_if_cancelling

__all__ = [
    "APIStatusError",
    "AsyncClient",
    "AsyncEventStream",
    "AuthenticationError",
    "Backoff",
    "BadRequestError",
    "CancelResult",
    "Client",
    "ConflictError",
    "ConnectionFailedError",
    "EventStream",
    "GoneError",
    "NotFoundError",
    "ProtocolError",
    "RateLimitError",
    "RequestCancelledError",
    "RequestStatus",
    "ServerError",
    "StreamError",
    "StreamEvent",
    "StreamGapError",
    "TokenspoolError",
    "UnprocessableError",
    "Usage",
]

CHAT_PATH: Final = "/v1/chat/completions"
COMPLETION_PATH: Final = "/v1/completions"


def _events_path(request_id: str) -> str:
    return f"/v1/requests/{request_id}/events"


def _request_path(request_id: str) -> str:
    """The status/cancel path; a value that is not a request id is refused before it can name another route."""
    if not keys.is_request_id(request_id):
        raise ValueError(f"not a tokenspool request id: {request_id!r}")
    return f"/v1/requests/{request_id}"


class _Options:
    """What both clients share: gateways (round-robin), timeouts, backoff and its random source."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        inter_token_timeout_s: float,
        connect_timeout_s: float,
        request_timeout_s: float,
        backoff: Backoff | None,
        max_event_bytes: int,
        rng: random.Random | None,
    ) -> None:
        if inter_token_timeout_s <= 0 or connect_timeout_s <= 0 or request_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")
        self.gateways = Gateways(base_url)
        self.backoff = backoff or Backoff()
        self.max_event_bytes = max_event_bytes
        self.rng = rng or random.Random()
        self.stream_timeout = httpx.Timeout(
            connect=connect_timeout_s, read=inter_token_timeout_s, write=request_timeout_s, pool=request_timeout_s
        )
        self.call_timeout = httpx.Timeout(request_timeout_s, connect=connect_timeout_s)

    def next_delay_s(self, failure: Failure, attempts: int, request_id: str | None) -> float:
        """The wait before attempt ``attempts + 1`` (on the next gateway), or the error to give up with."""
        if attempts >= self.backoff.max_attempts:
            error = give_up(failure, attempts, request_id)
            if error is failure.error:
                raise error
            raise error from failure.error
        self.gateways.advance()
        return self.backoff.delay_s(attempts, self.rng, failure.retry_after_s)


class _StreamSpec:
    """How to (re)open one stream: POST with an Idempotency-Key until the gateway named the request,
    then GET its events after the last one yielded."""

    def __init__(self, state: StreamState, path: str | None, body: dict[str, Any] | None, key: str | None) -> None:
        self.state = state
        self.path = path
        self.body = body
        self.idempotency_key = key
        self.opened = False
        self.resumes = 0
        self.retries = 0
        self.last_failure: str | None = None

    def request(self, gateways: Gateways) -> tuple[str, str, dict[str, Any]]:
        if self.state.request_id is None:
            assert self.path is not None and self.body is not None and self.idempotency_key is not None
            headers = {"Idempotency-Key": self.idempotency_key, "Accept": "text/event-stream"}
            return "POST", gateways.url(self.path), {"json": self.body, "headers": headers}
        headers = {"Accept": "text/event-stream"}
        if self.state.last_event_id:
            headers["Last-Event-ID"] = self.state.last_event_id
        return "GET", gateways.url(_events_path(self.state.request_id)), {"headers": headers}

    def on_open(self, response: httpx.Response) -> None:
        self.state.connected(response)
        if self.opened:
            self.resumes += 1
        self.opened = True

    def on_failure(self, failure: Failure) -> None:
        self.retries += 1
        self.last_failure = f"{type(failure.error).__name__}: {failure.error}"


def _answer_failure(response: httpx.Response, request_id: str | None) -> Failure:
    """A non-200 answer: raise it unless it says "retry later" (429, 502-504; never 404 or 410)."""
    error = error_from_response(response, request_id)
    if response.status_code not in RETRYABLE_STATUS:
        raise error
    return Failure(error, error.retry_after_s)


def _json_answer(response: httpx.Response, request_id: str | None) -> dict[str, Any]:
    body = response.json()
    if not isinstance(body, dict):
        raise ProtocolError(f"expected a JSON object, got {response.text[:200]!r}", request_id=request_id)
    return body


class _StreamProperties:
    _spec: _StreamSpec

    @property
    def request_id(self) -> str | None:
        """Known once the gateway answered the submission (before the first event is yielded)."""
        return self._spec.state.request_id

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event yielded: what a later ``attach`` continues after."""
        return self._spec.state.last_event_id

    @property
    def resumes(self) -> int:
        """Connections re-opened after one broke (successful resumes)."""
        return self._spec.resumes

    @property
    def retries(self) -> int:
        """Failed or broken attempts so far (each one waited out its backoff)."""
        return self._spec.retries

    @property
    def last_failure(self) -> str | None:
        """Why the last attempt broke or failed (for logs and tests), or None."""
        return self._spec.last_failure

    @property
    def finish_reason(self) -> str | None:
        return self._spec.state.finish_reason

    @property
    def usage(self) -> Usage | None:
        return self._spec.state.usage


# -- asyncio ---------------------------------------------------------------------------------------------


class AsyncEventStream(_StreamProperties):
    """An async iterator of :class:`StreamEvent` that resumes by itself; use it with ``async with`` (or
    iterate it to the end) so its connection is closed."""

    def __init__(self, client: AsyncClient, spec: _StreamSpec) -> None:
        self._client = client
        self._spec = spec
        self._events = self._run()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def text(self) -> str:
        """Read the stream to the end; its concatenated text."""
        return "".join([event.text async for event in self])

    async def _run(self) -> AsyncGenerator[StreamEvent, None]:
        options, spec, http = self._client._options, self._spec, self._client._http
        attempts = 0
        while True:
            method, url, kwargs = spec.request(options.gateways)
            try:
                async with http.stream(method, url, timeout=options.stream_timeout, **kwargs) as response:
                    if response.status_code == 204:  # a resume from the request's last event: it had ended
                        return
                    if response.status_code != 200:
                        await response.aread()
                        failure = _answer_failure(response, spec.state.request_id)
                    else:
                        spec.on_open(response)
                        decoder = SSEDecoder(options.max_event_bytes)
                        resume: Resume | None = None
                        async for chunk in response.aiter_bytes():
                            for item in decoder.feed(chunk):
                                outcome = spec.state.handle(item)
                                if isinstance(outcome, StreamEvent):
                                    attempts = 0
                                    yield outcome
                                elif outcome is FINISHED:
                                    return
                                elif isinstance(outcome, Resume):
                                    resume = outcome
                                    break
                            if resume is not None:
                                break
                        reason = resume.reason if resume else "the stream ended before [DONE]"
                        failure = Failure(ConnectionFailedError(reason, request_id=spec.state.request_id))
            except httpx.TransportError as exc:
                reraise_if_cancelling()
                failure = Failure(exc)
            attempts += 1
            spec.on_failure(failure)
            await asyncio.sleep(options.next_delay_s(failure, attempts, spec.state.request_id))


HttpT = TypeVar("HttpT", httpx.AsyncClient, httpx.Client)
StreamT = TypeVar("StreamT")


class _ClientBase(ABC, Generic[HttpT, StreamT]):
    """What the asyncio client and its blocking twin share: their arguments, and how each kind of stream is
    opened (the I/O, awaited or not, is each twin's own)."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        inter_token_timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 30.0,
        backoff: Backoff | None = None,
        headers: Mapping[str, str] | None = None,
        api_key: str | None = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        rng: random.Random | None = None,
    ) -> None:
        self._options = _Options(
            base_url,
            inter_token_timeout_s=inter_token_timeout_s,
            connect_timeout_s=connect_timeout_s,
            request_timeout_s=request_timeout_s,
            backoff=backoff,
            max_event_bytes=max_event_bytes,
            rng=rng,
        )
        self._http: HttpT = self._open_http(auth_headers(api_key, headers), self._options.call_timeout)

    @abstractmethod
    def _open_http(self, headers: dict[str, str], timeout: httpx.Timeout) -> HttpT:
        """Each twin opens its own kind of httpx client."""

    @abstractmethod
    def _stream(self, spec: _StreamSpec) -> StreamT:
        """Each twin wraps a stream in its own kind of iterator."""

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> StreamT:
        """Submit a streaming chat completion (``params``: any OpenAI parameter the gateway accepts)."""
        body = chat_body(messages, model, params)
        return self._stream(_StreamSpec(StreamState(), CHAT_PATH, body, idempotency_key or _new_key()))

    def stream_completion(
        self, prompt: Prompt, *, model: str, idempotency_key: str | None = None, **params: Any
    ) -> StreamT:
        """Submit a streaming (legacy) completion."""
        body = completion_body(prompt, model, params)
        return self._stream(_StreamSpec(StreamState(), COMPLETION_PATH, body, idempotency_key or _new_key()))

    def attach(self, request_id: str, last_event_id: str | None = None) -> StreamT:
        """Stream an existing request (from any process): from its start, or after ``last_event_id``."""
        return self._stream(_StreamSpec(_attach_state(request_id, last_event_id), None, None, None))


class AsyncClient(_ClientBase[httpx.AsyncClient, "AsyncEventStream"]):
    """An asyncio tokenspool client. It owns its ``httpx.AsyncClient``: use it as ``async with``.

    ``base_url``: one gateway or several (``http://host:8000`` or ``.../v1``); on a failure the client
    moves on to the next, round-robin. ``inter_token_timeout_s``: a stream silent this long (no event and
    no comment) is dropped and resumed. ``backoff``: the retry policy for connecting, resuming and 429/503.
    ``api_key``: sent as ``Authorization: Bearer`` on every call, for gateways that require keys (requests
    belong to the key that created them: only it can attach to, inspect or cancel them).
    """

    def _open_http(self, headers: dict[str, str], timeout: httpx.Timeout) -> httpx.AsyncClient:
        return httpx.AsyncClient(headers=headers, timeout=timeout)

    def _stream(self, spec: _StreamSpec) -> AsyncEventStream:
        return AsyncEventStream(self, spec)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def status(self, request_id: str) -> RequestStatus:
        return RequestStatus.parse(await self._call("GET", _request_path(request_id), request_id))

    async def cancel(self, request_id: str) -> CancelResult:
        """Cancel a request. Retried like a read: cancelling twice has the effect of cancelling once (a
        ``ConflictError`` says it had already ended)."""
        body = await self._call("DELETE", _request_path(request_id), request_id)
        return CancelResult(str(body.get("id", request_id)), str(body.get("state", "")))

    async def _call(self, method: str, path: str, request_id: str) -> dict[str, Any]:
        options = self._options
        attempts = 0
        while True:
            try:
                response = await self._http.request(method, options.gateways.url(path))
            except httpx.TransportError as exc:
                reraise_if_cancelling()
                failure = Failure(exc)
            else:
                if response.is_success:
                    return _json_answer(response, request_id)
                failure = _answer_failure(response, request_id)
            attempts += 1
            await asyncio.sleep(options.next_delay_s(failure, attempts, request_id))


# -- blocking --------------------------------------------------------------------------------------------


class EventStream(_StreamProperties):
    """An iterator of :class:`StreamEvent` that resumes by itself; use it with ``with`` (or iterate it to
    the end) so its connection is closed."""

    def __init__(self, client: Client, spec: _StreamSpec) -> None:
        self._client = client
        self._spec = spec
        self._events = self._run()

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def text(self) -> str:
        """Read the stream to the end; its concatenated text."""
        return "".join(event.text for event in self)

    def _run(self) -> Generator[StreamEvent, None, None]:
        options, spec, http = self._client._options, self._spec, self._client._http
        attempts = 0
        while True:
            method, url, kwargs = spec.request(options.gateways)
            try:
                with http.stream(method, url, timeout=options.stream_timeout, **kwargs) as response:
                    if response.status_code == 204:  # a resume from the request's last event: it had ended
                        return
                    if response.status_code != 200:
                        response.read()
                        failure = _answer_failure(response, spec.state.request_id)
                    else:
                        spec.on_open(response)
                        decoder = SSEDecoder(options.max_event_bytes)
                        resume: Resume | None = None
                        for chunk in response.iter_bytes():
                            for item in decoder.feed(chunk):
                                outcome = spec.state.handle(item)
                                if isinstance(outcome, StreamEvent):
                                    attempts = 0
                                    yield outcome
                                elif outcome is FINISHED:
                                    return
                                elif isinstance(outcome, Resume):
                                    resume = outcome
                                    break
                            if resume is not None:
                                break
                        reason = resume.reason if resume else "the stream ended before [DONE]"
                        failure = Failure(ConnectionFailedError(reason, request_id=spec.state.request_id))
            except httpx.TransportError as exc:
                failure = Failure(exc)
            attempts += 1
            spec.on_failure(failure)
            time.sleep(options.next_delay_s(failure, attempts, spec.state.request_id))


class Client(_ClientBase[httpx.Client, "EventStream"]):
    """The blocking twin of :class:`AsyncClient` (same arguments, same rules); use it as ``with``."""

    def _open_http(self, headers: dict[str, str], timeout: httpx.Timeout) -> httpx.Client:
        return httpx.Client(headers=headers, timeout=timeout)

    def _stream(self, spec: _StreamSpec) -> EventStream:
        return EventStream(self, spec)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def status(self, request_id: str) -> RequestStatus:
        return RequestStatus.parse(self._call("GET", _request_path(request_id), request_id))

    def cancel(self, request_id: str) -> CancelResult:
        body = self._call("DELETE", _request_path(request_id), request_id)
        return CancelResult(str(body.get("id", request_id)), str(body.get("state", "")))

    def _call(self, method: str, path: str, request_id: str) -> dict[str, Any]:
        options = self._options
        attempts = 0
        while True:
            try:
                response = self._http.request(method, options.gateways.url(path))
            except httpx.TransportError as exc:
                failure = Failure(exc)
            else:
                if response.is_success:
                    return _json_answer(response, request_id)
                failure = _answer_failure(response, request_id)
            attempts += 1
            time.sleep(options.next_delay_s(failure, attempts, request_id))


def _attach_state(request_id: str, last_event_id: str | None) -> StreamState:
    _request_path(request_id)
    return StreamState(request_id, last_event_id)


def _new_key() -> str:
    return f"tokenspool-client-{uuid.uuid4()}"
