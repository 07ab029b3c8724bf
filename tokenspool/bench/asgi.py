"""What the benchmark's bare ASGI servers (the floor, the lean broker, the ceiling) share: lifespan, body,
the chunk they write, serving."""

from __future__ import annotations

from typing import Any

import orjson

from tokenspool.gateway.sse import event_frame
from tokenspool.shared import keys

ASGIMessage = dict[str, Any]
STREAM_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def answer_lifespan(receive: Any, send: Any) -> None:
    """Nothing to start or stop: acknowledge both."""
    await receive()
    await send({"type": "lifespan.startup.complete"})
    await receive()
    await send({"type": "lifespan.shutdown.complete"})


async def read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message: ASGIMessage = await receive()
        chunk: bytes = message.get("body", b"")
        body += chunk
        if not message.get("more_body"):
            return body


def chunk_frame(base: dict[str, Any], seq: int, text: str, finish_reason: str | None) -> bytes:
    """Delta ``seq`` (from 1) of a chat stream as the SSE frame tokenspool sends: ``base`` holds the chunk's
    ``id``, ``object``, ``created`` and ``model``; the first delta carries the role."""
    content: dict[str, Any] = {"role": "assistant", "content": text} if seq == 1 else {"content": text}
    choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}
    return event_frame(keys.event_id(base["id"], seq), orjson.dumps({**base, "choices": [choice]}))


async def empty_response(send: Any, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def serve(app: Any, port: int) -> None:
    """Under the gateway's own server stack (uvicorn, uvloop, httptools), so the comparison is fair."""
    import uvicorn

    uvicorn.run(
        app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", access_log=False, log_level="warning"
    )
