"""The naive relay: the Redis-backed streaming server people write first, as the baseline to beat.

It is what the seed document's per-request queue becomes once a Redis stream replaces the in-process
``asyncio.Queue``: the gateway puts a JSON job on a queue stream and then, for every client, loops on its
own blocking ``XREAD`` of that request's stream (one pooled Redis connection held per streaming client);
the worker takes jobs with ``XREADGROUP``, runs the same sim engine, and ``XADD``s one JSON entry per token,
one round trip each. FastAPI, ``StreamingResponse``, the standard library's ``json``. It is correct (ids
count up, nothing is lost) but has no resume, no batching and no multiplexing.

The benchmark's own keys live under ``naive-relay:`` and never touch tokenspool's keyspace. Run by
``tokenspool bench``; ``python -m tokenspool.bench.naive gateway|worker ...`` runs a piece alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aredis
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from tokenspool.bench.sim import chat_request, run_broker, sim_engine
from tokenspool.gateway.sse import DONE_FRAME, event_frame

QUEUE = "naive-relay:queue"
GROUP = "workers"
STREAM_TTL_S = 600


def stream_name(request_id: str) -> str:
    return f"naive-relay:stream:{request_id}"


def gateway_app(redis_url: str) -> FastAPI:
    app = FastAPI()
    client: Any = aredis.Redis.from_url(redis_url, max_connections=100_000)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        request_id = "chatcmpl-" + uuid.uuid4().hex
        await client.xadd(QUEUE, {"data": json.dumps({"id": request_id, "body": body})})

        async def relay() -> AsyncIterator[bytes]:
            last = "0"
            seq = 0
            created = int(time.time())
            while True:
                reply = await client.xread({stream_name(request_id): last}, block=0)
                for _key, entries in reply:
                    for entry_id, fields in entries:
                        last = entry_id
                        message = json.loads(fields[b"data"])
                        if message["done"]:
                            yield DONE_FRAME
                            return
                        seq += 1
                        delta = {"content": message["text"]}
                        if seq == 1:
                            delta["role"] = "assistant"
                        chunk = {
                            "id": request_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": body["model"],
                            "choices": [
                                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": message["finish"]}
                            ],
                        }
                        yield event_frame(f"{request_id}:{seq}", json.dumps(chunk).encode())

        return StreamingResponse(relay(), media_type="text/event-stream")

    return app


async def run_worker(redis_url: str, consumer: str, sim_ttft_ms: str, sim_itl_ms: str) -> None:
    engine = sim_engine(sim_ttft_ms, sim_itl_ms)
    client: Any = aredis.Redis.from_url(redis_url, max_connections=100_000)
    with contextlib.suppress(aredis.ResponseError):  # another worker created it
        await client.xgroup_create(QUEUE, GROUP, id="0", mkstream=True)
    running: set[asyncio.Task[None]] = set()

    async def generate(entry_id: bytes, job: dict[str, Any]) -> None:
        request = chat_request(job["id"], job["body"])
        name = stream_name(job["id"])
        async for delta in engine.generate(request):
            message = {"done": False, "text": delta.text, "finish": delta.finish_reason}
            await client.xadd(name, {"data": json.dumps(message)})
        await client.xadd(name, {"data": json.dumps({"done": True})})
        await client.expire(name, STREAM_TTL_S)
        await client.xack(QUEUE, GROUP, entry_id)

    while True:
        reply = await client.xreadgroup(GROUP, consumer, {QUEUE: ">"}, count=100, block=1000)
        for _key, entries in reply or ():
            for entry_id, fields in entries:
                task = asyncio.create_task(generate(entry_id, json.loads(fields[b"data"])))
                running.add(task)
                task.add_done_callback(running.discard)


def _serve_gateway(redis_url: str, port: int) -> None:
    import uvicorn

    uvicorn.run(gateway_app(redis_url), host="127.0.0.1", port=port, access_log=False, log_level="warning")


def main(argv: list[str] | None = None) -> None:
    run_broker("tokenspool.bench.naive", __doc__, argv, run_worker, _serve_gateway)


if __name__ == "__main__":
    main()
