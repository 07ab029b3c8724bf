"""The lean broker: the least any Redis-Streams broker of tokenspool's shape does per request, as a bound.

tokenspool's per-request cost is measured against it to tell what the architecture costs (three processes
meeting in Redis streams, redis-py as the client) from what tokenspool adds on top. It keeps only what such a
broker cannot drop: the gateway, a bare ASGI app like the floor, puts the request body on a queue stream
with one ``XADD`` and reads the request's own stream with a blocking ``XREAD`` on a pooled connection; the
worker takes entries with ``XREADGROUP``, runs the same sim engine, ``XADD``s each delta (msgpack) and sends
the last one with the end marker, the stream's TTL and the queue ``XACK`` in one pipeline. It has no request
record, resume, takeover, fencing, limits, validation or metrics, and writes one round trip per token (no
batching): a lower bound per request, not per event (tokenspool's batched relay costs less per event).

Its keys live under ``lean-broker:``. Run by ``tokenspool bench --targets lean,...``;
``python -m tokenspool.bench.lean gateway|worker ...`` runs a piece alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

import msgpack
import orjson
import redis.asyncio as aredis

from tokenspool.bench.asgi import STREAM_HEADERS, answer_lifespan, chunk_frame, empty_response, read_body, serve
from tokenspool.bench.sim import chat_request, sim_engine
from tokenspool.gateway.sse import DONE_FRAME
from tokenspool.shared import keys

QUEUE = "lean-broker:queue"
GROUP = "workers"
STREAM_TTL_MS = 600_000


def stream_name(request_id: str) -> str:
    return f"lean-broker:stream:{request_id}"


class LeanGateway:
    """``POST /v1/chat/completions`` (stream only) and ``GET /healthz``, like the floor, over Redis."""

    def __init__(self, redis_url: str) -> None:
        self.client: Any = aredis.Redis.from_url(redis_url, max_connections=100_000)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["path"] != "/v1/chat/completions" or scope["method"] != "POST":
            await empty_response(send, 200 if scope["path"] == "/healthz" else 404)
            return
        raw = await read_body(receive)
        model = orjson.loads(raw)["model"]
        request_id = keys.new_request_id("chat")
        await self.client.xadd(QUEUE, {"id": request_id, "body": raw})
        await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
        base = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        name, last, seq = stream_name(request_id), "0", 0
        while True:
            reply = await self.client.xread({name: last}, block=0)
            for _key, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    done, text, finish_reason = msgpack.unpackb(fields[b"d"])
                    if done:
                        await send({"type": "http.response.body", "body": DONE_FRAME, "more_body": False})
                        return
                    seq += 1
                    frame = chunk_frame(base, seq, text, finish_reason)
                    await send({"type": "http.response.body", "body": frame, "more_body": True})


async def run_worker(redis_url: str, consumer: str, sim_ttft_ms: str, sim_itl_ms: str) -> None:
    engine = sim_engine(sim_ttft_ms, sim_itl_ms)
    client: Any = aredis.Redis.from_url(redis_url, max_connections=100_000)
    with contextlib.suppress(aredis.ResponseError):  # another worker created it
        await client.xgroup_create(QUEUE, GROUP, id="0", mkstream=True)
    running: set[asyncio.Task[None]] = set()

    async def generate(entry_id: bytes, request_id: str, body: dict[str, Any]) -> None:
        name = stream_name(request_id)
        held: bytes | None = None  # each delta waits for the next, so the last rides with the end marker
        async for delta in engine.generate(chat_request(request_id, body)):
            if held is not None:
                await client.xadd(name, {"d": held})
            held = msgpack.packb((False, delta.text, delta.finish_reason))
        pipe = client.pipeline(transaction=False)
        if held is not None:
            pipe.xadd(name, {"d": held})
        pipe.xadd(name, {"d": msgpack.packb((True, "", None))})
        pipe.pexpire(name, STREAM_TTL_MS)
        pipe.xack(QUEUE, GROUP, entry_id)
        await pipe.execute()

    while True:
        reply = await client.xreadgroup(GROUP, consumer, {QUEUE: ">"}, count=100, block=1000)
        for _key, entries in reply or ():
            for entry_id, fields in entries:
                job = generate(entry_id, fields[b"id"].decode(), orjson.loads(fields[b"body"]))
                task = asyncio.create_task(job)
                running.add(task)
                task.add_done_callback(running.discard)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenspool.bench.lean", description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("gateway", "worker"))
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--sim-ttft-ms", default="50")
    parser.add_argument("--sim-itl-ms", default="20")
    args = parser.parse_args(argv)
    if args.role == "worker":
        import uvloop

        uvloop.run(run_worker(args.redis_url, "lean-worker", args.sim_ttft_ms, args.sim_itl_ms))
        return
    serve(LeanGateway(args.redis_url), args.port)


if __name__ == "__main__":
    main()
