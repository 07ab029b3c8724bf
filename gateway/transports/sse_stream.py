"""The SSE transport: a stream session's items as Server-Sent Events, written by a response that gives
every write ``send_timeout_s``.

One connection has one concurrency shape (as in sse-starlette): a task that writes frames and a task that
listens for the client's disconnect; whichever ends first cancels the other, and cancellation is always
re-raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from typing import Final

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from tokenspool.gateway.chunks import ChunkRenderer, error_body
from tokenspool.gateway.session import Events, Heartbeat, Queued, StreamSession, Transport
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


async def sse_frames(session: StreamSession, *, event_ids: bool = True) -> AsyncIterator[bytes]:
    """The SSE body of a stream: rendered events (several per write when the client is behind),
    queue-position comments while the request waits, heartbeats while idle, then ``[DONE]`` (in the same
    write as the terminal event; after an interruption, as an error event without an id)."""
    renderer = ChunkRenderer(session.point.meta, event_ids=event_ids)
    done = False
    async with aclosing(session.items()) as items:
        async for item in items:
            if isinstance(item, Events):
                frames = renderer.render(item.events)
                if item.final_state:
                    frames += renderer.done_frame()
                    done = True
                if frames:
                    yield frames
            elif isinstance(item, Queued):
                yield comment_frame(item.notice())
            elif isinstance(item, Heartbeat):
                yield comment_frame("ping")
            else:
                yield data_frame(orjson.dumps(error_body(item.code, item.message)))
    if not done:
        yield DONE_FRAME


def sse_response(
    session: StreamSession, *, send_timeout_s: float, headers: Mapping[str, str], event_ids: bool = True
) -> SSEResponse:
    """The response that streams a session; it gives the session's place back when it ends."""
    frames = sse_frames(session, event_ids=event_ids)
    return SSEResponse(frames, send_timeout_s=send_timeout_s, headers=headers, on_close=session.close)


class SSEResponse(StreamingResponse):
    """``text/event-stream`` whose every write must be accepted by the client within ``send_timeout_s``."""

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
        writer = asyncio.create_task(self._write(send))
        listener = asyncio.create_task(self._wait_for_disconnect(receive))
        try:
            await asyncio.wait({writer, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, listener):
                task.cancel()
            await asyncio.gather(writer, listener, return_exceptions=True)
            try:
                await self._frames.aclose()  # type: ignore[attr-defined]
            finally:
                if self._on_close is not None:
                    self._on_close()
        if writer.done() and not writer.cancelled() and writer.exception() is not None:
            raise writer.exception()  # type: ignore[misc]

    async def _write(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self._frames:
            message: Message = {"type": "http.response.body", "body": chunk, "more_body": True}
            try:
                async with asyncio.timeout(self._send_timeout_s):  # a timer, not a task per write
                    await send(message)
            except TimeoutError:
                log.info("client did not accept a write within %.1fs; closing its stream", self._send_timeout_s)
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _wait_for_disconnect(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
