"""The SSE frame encoder: this module is the only place that builds Server-Sent Events bytes (the response
that sends them is :mod:`tokenspool.gateway.transports.sse_stream`)."""

from __future__ import annotations

from typing import Final

DONE_FRAME: Final = b"data: [DONE]\n\n"


def event_frame(event_id: str | None, data: bytes) -> bytes:
    """One SSE event, with an ``id:`` line unless ``event_id`` is None (then exactly vLLM's frame: ``data:``
    alone). ``data`` may span lines; each becomes its own ``data:`` line."""
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        body = b"".join(b"data: " + line + b"\n" for line in lines)
    else:
        body = b"data: " + data + b"\n"
    if event_id is None:
        return body + b"\n"
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


def named_frame(event: str, data: bytes) -> bytes:
    """An SSE event with an ``event:`` name and no id, as OpenAI sends Responses API events (``data`` is one
    line of JSON; a client resumes those by sequence number, not by ``Last-Event-ID``)."""
    clean = event.replace("\r", "").replace("\n", "")
    return b"event: " + _utf8(clean) + b"\ndata: " + data.replace(b"\r", b" ").replace(b"\n", b" ") + b"\n\n"
