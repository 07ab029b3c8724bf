"""A raw asyncio HTTP/1.1 client that reads one SSE stream and times every event.

A benchmark whose client is httpx measures httpx: on this machine it spends ~60 µs of CPU per event, more
than the broker under test. This client does only what timing needs: one request per connection, chunked
transfer decoding, frames decoded by the client's own :class:`~tokenspool.client_core.SSEDecoder`, a
timestamp per read, and the checks that catch a broken stream — event ids must count up by one (a gap is a
lost event, a repeat a duplicate) and the reply must carry exactly the tokens asked for.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from tokenspool.client_core import ProtocolError, SSEDecoder, SSEMessage


@dataclass(slots=True)
class StreamRecord:
    """What one streamed request looked like from the client's side."""

    started_s: float
    """When it was sent, on the run's clock (seconds since the run began)."""
    ok: bool = False
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    tokens: int = 0
    events: int = 0
    lost: int = 0
    duplicated: int = 0
    itl_s: list[float] = field(default_factory=list)


def request_bytes(host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Tally:
    """Per-stream bookkeeping while frames arrive."""

    __slots__ = ("done", "expected_tokens", "last_seq", "last_token_at", "record", "sent_at")

    def __init__(self, record: StreamRecord, sent_at: float, expected_tokens: int) -> None:
        self.record = record
        self.sent_at = sent_at
        self.expected_tokens = expected_tokens
        self.last_seq = 0
        self.last_token_at = 0.0
        self.done = False

    def message(self, message: SSEMessage, now: float) -> None:
        if message.data == "[DONE]":
            self.done = True
            return
        record = self.record
        if message.id is not None:
            seq = int(message.id.rpartition(":")[2])
            record.events += 1
            if seq <= self.last_seq:
                record.duplicated += 1
                return
            if seq > self.last_seq + 1:
                record.lost += seq - self.last_seq - 1
            self.last_seq = seq
        chunk = orjson.loads(message.data)
        if "error" in chunk:
            raise StreamError(str(chunk["error"].get("message", chunk["error"])))
        choices = chunk.get("choices") or ()
        if choices and choices[0].get("delta", {}).get("content"):
            record.tokens += 1
            if record.tokens == 1:
                record.ttft_s = now - self.sent_at
            else:
                record.itl_s.append(now - self.last_token_at)
            self.last_token_at = now


class StreamError(Exception):
    """The server answered, but not with a complete stream."""


async def stream_request(
    host: str,
    port: int,
    path: str,
    body: bytes,
    *,
    expected_tokens: int,
    started_s: float,
    timeout_s: float,
    headers: dict[str, str] | None = None,
) -> StreamRecord:
    """Send one streaming request and read it to ``[DONE]``; never raises for a failed request."""
    record = StreamRecord(started_s=started_s)
    sent_at = time.perf_counter()
    tally = _Tally(record, sent_at, expected_tokens)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request_bytes(host, port, path, body, headers))
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                rest = await reader.read(2000)
                raise StreamError(f"HTTP {status}: {rest[:300]!r}")
            if b"chunked" not in head.lower():
                raise StreamError("expected a chunked streaming response")
            decoder = SSEDecoder()
            while not tally.done:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.strip(), 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    break
                now = time.perf_counter()
                for item in decoder.feed(chunk[:-2]):
                    if type(item) is SSEMessage:  # comments (heartbeat, queue position, handover) count nothing
                        tally.message(item, now)
            record.e2e_s = time.perf_counter() - sent_at
            if not tally.done:
                raise StreamError("the stream ended without [DONE]")
            if record.tokens != expected_tokens:
                record.lost += max(0, expected_tokens - record.tokens)
                raise StreamError(f"got {record.tokens} tokens, expected {expected_tokens}")
            record.ok = True
    except TimeoutError:
        record.error = f"timed out after {timeout_s:g}s"
    except (
        StreamError,
        ProtocolError,
        OSError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        ValueError,
    ) as exc:
        record.error = str(exc) or type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
    return record


async def open_stream(host: str, port: int, path: str, body: bytes, timeout_s: float) -> asyncio.StreamWriter:
    """Send a streaming request and return once its first event has arrived; the caller closes it."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request_bytes(host, port, path, body))
            head = await reader.readuntil(b"\r\n\r\n")
            if int(head.split(b" ", 2)[1]) != 200:
                raise StreamError(f"HTTP error: {head[:100]!r}")
            seen = b""
            while b"\nid:" not in seen and not seen.startswith(b"id:"):
                seen += await reader.readuntil(b"\r\n")
                seen = seen[-4096:]
        except BaseException:
            writer.close()
            raise
    reader_transport: Any = writer.transport
    reader_transport.pause_reading()  # hold the stream open without reading more of it
    return writer
