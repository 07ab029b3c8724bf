"""What the benchmark's bare ASGI servers (the floor and the ceiling) share: lifespan, body, serving."""

from __future__ import annotations

from typing import Any

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


async def empty_response(send: Any, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def serve(app: Any, port: int) -> None:
    """Under the gateway's own server stack (uvicorn, uvloop, httptools), so the comparison is fair."""
    import uvicorn

    uvicorn.run(
        app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", access_log=False, log_level="warning"
    )
