"""The SSE transport: a stream session's items as Server-Sent Events, written by a response that gives
every write ``send_timeout_s``.

One connection has one concurrency shape (as in sse-starlette): a task that writes frames and a task that
listens for the client's disconnect; whichever ends first cancels the other, and so does a write the client
has not accepted within ``send_timeout_s`` (a watchdog timer resolves a future the response waits on with
them). Cancellation is always re-raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from typing import Final

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenspool.gateway.chunks import ChunkRenderer, error_body
from tokenspool.gateway.errors import engine_refusal
from tokenspool.gateway.session import Events, Heartbeat, Queued, StreamItem, StreamSession, Transport
from tokenspool.gateway.sse import DONE_FRAME, comment_frame, data_frame

log = logging.getLogger("tokenspool.gateway.sse")

SSE: Final = Transport("SSE", resume_hint="resume with Last-Event-ID")
# No "Connection: keep-alive" (some guides add it): it is a hop-by-hop header the server manages, and
# proxies (nginx, Cloudflare) strip it anyway.
STREAM_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def wants_event_ids(accept: str | None, *, idempotency_key: str | None) -> bool:
    """Whether a POST's stream carries ``id:`` lines: for a client that shows it can resume, by asking for an
    event stream (``Accept: text/event-stream``, as EventSource, @microsoft/fetch-event-source and
    tokenspool's clients send) or by naming its request for a retry (``Idempotency-Key``). Every other
    client (the OpenAI SDKs send ``application/json``, ``vllm bench serve`` and curl ``*/*``) gets vLLM's
    frames, which parsers that strip a leading ``data: `` from each event can read (ARCHITECTURE.md)."""
    if idempotency_key is not None:
        return True
    if accept is None:
        return False
    return any(part.split(";", 1)[0].strip().lower() == "text/event-stream" for part in accept.split(","))


async def sse_frames(
    session: StreamSession,
    *,
    event_ids: bool = True,
    items: AsyncGenerator[StreamItem, None] | None = None,
    first: StreamItem | None = None,
) -> AsyncIterator[bytes]:
    """The SSE body of a stream: rendered events (several per write when the client is behind),
    queue-position comments while the request waits, heartbeats while idle, then ``[DONE]`` (in the same
    write as the terminal event; after an interruption, as an error event without an id). ``items`` and
    ``first``: a session's items already opened, and the one already taken from them (see :func:`open_sse`)."""
    renderer = ChunkRenderer(session.point.meta, event_ids=event_ids)
    done = False

    def frames_of(item: StreamItem) -> bytes:
        nonlocal done
        if isinstance(item, Events):
            frames = renderer.render(item.events)
            if item.final_state:
                frames += renderer.done_frame()
                done = True
            return frames
        if isinstance(item, Queued):
            return comment_frame(item.notice())
        if isinstance(item, Heartbeat):
            return comment_frame("ping")
        return data_frame(orjson.dumps(error_body(item.code, item.message)))

    async with aclosing(items if items is not None else session.items()) as stream:
        if first is not None and (frames := frames_of(first)):
            yield frames
        async for item in stream:
            if frames := frames_of(item):
                yield frames
    if not done:
        yield DONE_FRAME


def sse_response(
    session: StreamSession, *, send_timeout_s: float, headers: Mapping[str, str], event_ids: bool = True
) -> SSEResponse:
    """The response that streams a session; it gives the session's place back when it ends."""
    frames = sse_frames(session, event_ids=event_ids)
    return SSEResponse(frames, send_timeout_s=send_timeout_s, headers=headers, on_close=session.close)


async def open_sse(
    session: StreamSession, *, send_timeout_s: float, headers: Mapping[str, str], event_ids: bool = True
) -> SSEResponse:
    """The response that streams a new request, once its first item says it was not refused.

    What vLLM refuses after the gateway accepted the request (``n > 1`` at temperature 0, a grammar vLLM
    cannot build, an image for a text-only model) comes back as the request's first stored event; ``vllm
    serve`` answers it with a 4xx before any byte of stream, so this waits for the first item (an event,
    or the first queue notice or heartbeat of a request that waits) before committing to a 200, and raises
    the refusal as :class:`APIError` instead. A request taken at once costs nothing more: its first frame
    could not have been written earlier, and the status line now goes with it."""
    items = session.items()
    try:
        first = await anext(items, None)
        refusal = None
        if isinstance(first, Events) and first.events[0][0] == 1:
            refusal = engine_refusal(first.events[0][1])
        if refusal is not None:
            refusal.headers.update(headers)
            raise refusal
    except BaseException:
        try:
            await items.aclose()
        finally:
            session.close()
        raise
    frames = sse_frames(session, event_ids=event_ids, items=items, first=first)
    return SSEResponse(frames, send_timeout_s=send_timeout_s, headers=headers, on_close=session.close)


class SendWatchdog:
    """Resolves ``stalled`` once a write has waited ``timeout_s`` for the client to accept it, with one timer
    per stream instead of one per write: a timer armed and cancelled around every write (``asyncio.timeout``)
    was a sixth of a gateway's CPU per event at 100 streams. The writer marks when its write began
    (``sending_since``) and clears it when the write returns; the timer looks every half ``timeout_s``, and
    once a write is in progress, again when that write would reach ``timeout_s``. A stalled client is thus
    dropped after ``timeout_s`` and within 1.5 times ``timeout_s``."""

    __slots__ = ("_handle", "_loop", "_stalled", "_timeout_s", "sending_since")

    def __init__(self, timeout_s: float, stalled: asyncio.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._stalled = stalled
        self.sending_since: float | None = None
        self._handle = self._loop.call_later(timeout_s / 2, self._look)

    def now(self) -> float:
        return self._loop.time()

    def _look(self) -> None:
        since = self.sending_since
        now = self._loop.time()
        if since is not None and now - since >= self._timeout_s:
            if not self._stalled.done():
                self._stalled.set_result(None)
            return
        due = now + self._timeout_s / 2 if since is None else since + self._timeout_s
        self._handle = self._loop.call_at(due, self._look)

    def stop(self) -> None:
        self._handle.cancel()


class SSEResponse(StreamingResponse):
    """``text/event-stream`` whose every write must be accepted by the client within ``send_timeout_s``
    (:class:`SendWatchdog`)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        send_timeout_s: float,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(frames, media_type=self.media_type, headers={**STREAM_HEADERS, **(headers or {})})
        self._frames = frames
        self._send_timeout_s = send_timeout_s
        self._on_close = on_close
        """Called once the response has ended however it ended, even if no frame was ever asked for (a
        generator that never started runs no ``finally`` of its own)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stalled = asyncio.get_running_loop().create_future()
        watchdog = SendWatchdog(self._send_timeout_s, stalled)
        writer = asyncio.create_task(self._write(send, watchdog))
        listener = asyncio.create_task(self._wait_for_disconnect(receive))
        try:
            await asyncio.wait({writer, listener, stalled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watchdog.stop()
            for task in (writer, listener):
                task.cancel()
            await asyncio.gather(writer, listener, return_exceptions=True)
            try:
                await self._frames.aclose()  # type: ignore[attr-defined]
            finally:
                if self._on_close is not None:
                    self._on_close()
        if stalled.done():
            log.info("client did not accept a write within %.1fs; closed its stream", self._send_timeout_s)
        elif writer.done() and not writer.cancelled() and writer.exception() is not None:
            raise writer.exception()  # type: ignore[misc]

    async def _write(self, send: Send, watchdog: SendWatchdog) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self._frames:
            watchdog.sending_since = watchdog.now()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            watchdog.sending_since = None
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _wait_for_disconnect(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
