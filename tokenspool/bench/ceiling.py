"""The ceiling: a bare ASGI app that writes pre-built events and does nothing else.

No Redis, no JSON, no per-event work: each request gets ``max_tokens`` chunks built once at start, one
``send`` per event, under the same uvicorn (uvloop + httptools) as the gateway. What one core does here is
the most any Python relay on this stack can do; the relay scenario reports the gateway's share of it.
"""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from tokenspool.bench.asgi import STREAM_HEADERS, answer_lifespan, empty_response, read_body, serve
from tokenspool.gateway.sse import DONE_FRAME, event_frame
from tokenspool.shared import keys


def prebuilt_frames(count: int) -> list[bytes]:
    """Chunks shaped and sized like the gateway's, for one fixed request id."""
    request_id = keys.new_request_id("chat")
    frames = []
    for seq in range(1, count + 1):
        delta: dict[str, Any] = {"content": " token"} if seq > 1 else {"role": "assistant", "content": "token"}
        chunk = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "bench-sim",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
        }
        frames.append(event_frame(keys.event_id(request_id, seq), orjson.dumps(chunk)))
    return frames


class CeilingApp:
    def __init__(self, max_events: int) -> None:
        self.frames = prebuilt_frames(max_events)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        raw = await read_body(receive)
        if scope["path"] != "/v1/chat/completions":
            await empty_response(send, 200)
            return
        count = min(int(orjson.loads(raw)["max_tokens"]), len(self.frames))
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        for frame in self.frames[:count]:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": DONE_FRAME, "more_body": False})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenspool.bench.ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-events", type=int, default=10_000)
    args = parser.parse_args(argv)
    serve(CeilingApp(args.max_events), args.port)


if __name__ == "__main__":
    main()
