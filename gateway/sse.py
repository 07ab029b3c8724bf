"""The SSE frame encoder and the streaming response that sends frames with a timeout on every write.

This module is the only place that builds Server-Sent Events bytes. One connection has one concurrency
shape (as in sse-starlette): a task that writes frames and a task that listens for the client's
disconnect; whichever ends first cancels the other, and cancellation is always re-raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Final

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger("tokenspool.gateway.sse")

DONE_FRAME: Final = b"data: [DONE]\n\n"
# No "Connection: keep-alive" (some guides add it): it is a hop-by-hop header the server manages, and
# proxies (nginx, Cloudflare) strip it anyway.
STREAM_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event_frame(event_id: str, data: bytes) -> bytes:
    """One SSE event with an ``id:`` line. ``data`` may span lines; each becomes its own ``data:`` line."""
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        body = b"".join(b"data: " + line + b"\n" for line in lines)
    else:
        body = b"data: " + data + b"\n"
    clean_id = event_id.replace("\r", "").replace("\n", "").replace("\0", "")
    return b"id: " + _utf8(clean_id) + b"\n" + body + b"\n"


def data_frame(data: bytes) -> bytes:
    """An SSE event without an id (used for the out-of-band error of a stream that cannot go on)."""
    return b"data: " + data.replace(b"\r", b" ").replace(b"\n", b" ") + b"\n\n"


def comment_frame(text: str) -> bytes:
    """An SSE comment: clients ignore it; proxies see traffic; people reading the stream see why it waits."""
    return b": " + _utf8(text.replace("\r", " ").replace("\n", " ")) + b"\n\n"


def _utf8(text: str) -> bytes:
    """UTF-8, with any lone surrogate (which has none) replaced: a frame is always valid UTF-8, so a client's
    decoder never fails on it, whatever text reached the encoder."""
    return text.encode("utf-8", "replace")


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
