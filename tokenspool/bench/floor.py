"""The floor: the same sim engine streamed straight from the process that runs it, with no broker.

This is the least any server can cost for the same replies: one process, the engine's generator driven by
the request's own coroutine, each delta rendered as the same OpenAI chunk tokenspool sends and written at
once. No queue, no Redis, no resume — whatever tokenspool measures above this is the broker's price.
Run by ``tokenspool bench``; ``python -m tokenspool.bench.floor --port N`` runs it alone.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import orjson

from tokenspool.bench.asgi import (
    STREAM_HEADERS,
    ASGIMessage,
    answer_lifespan,
    chunk_frame,
    empty_response,
    read_body,
    serve,
)
from tokenspool.bench.sim import chat_request, sim_engine
from tokenspool.gateway.sse import DONE_FRAME
from tokenspool.shared import keys
from tokenspool.worker.engines.sim import SimEngine


class FloorApp:
    """A bare ASGI app: ``POST /v1/chat/completions`` (stream only) and ``GET /healthz``."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine

    async def __call__(self, scope: ASGIMessage, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["path"] != "/v1/chat/completions" or scope["method"] != "POST":
            await empty_response(send, 200 if scope["path"] == "/healthz" else 404)
            return
        body = orjson.loads(await read_body(receive))
        request_id = keys.new_request_id("chat")
        request = chat_request(request_id, body)
        base = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
        }
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        seq = 0
        async for delta in self.engine.generate(request):
            seq += 1
            frame = chunk_frame(base, seq, delta.text, delta.finish_reason)
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": DONE_FRAME, "more_body": False})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenspool.bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sim-ttft-ms", default="50")
    parser.add_argument("--sim-itl-ms", default="20")
    args = parser.parse_args(argv)
    serve(FloorApp(sim_engine(args.sim_ttft_ms, args.sim_itl_ms)), args.port)


if __name__ == "__main__":
    main()
