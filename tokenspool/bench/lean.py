"""The lean broker: the least a Redis-Streams broker of tokenspool's shape does, as a bound for its cost.

tokenspool's CPU per request and per event are measured against it to tell what the architecture costs
(three processes meeting in Redis streams, redis-py as the client, uvicorn serving a bare ASGI app like the
floor) from what tokenspool adds on top. It keeps the two batchings that make tokenspool cheap per event and
drops everything else:

- the gateway puts the request body on a queue stream with one ``XADD`` and reads the events of every open
  stream with one multiplexed blocking ``XREAD`` (a new stream unblocks it with ``CLIENT UNBLOCK``);
- the worker takes entries with ``XREADGROUP``, runs the same sim engine, and sends the deltas every request
  produced since the last send with one script call (``XADD`` each; a finished request's end marker, TTL
  and queue ``XACK`` ride along).

It has no request record, resume, takeover, fencing, limits, validation, metrics or heartbeats, and its
per-stream buffers are unbounded (a reply is at most ``--max-tokens`` events): a bound to measure against,
never a server to run. Its keys live under ``lean-broker:``. Run by ``tokenspool bench --targets lean,...``;
``python -m tokenspool.bench.lean gateway|worker ...`` runs a piece alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from typing import Any

import msgpack
import orjson
import redis.asyncio as aredis

from tokenspool.bench.asgi import STREAM_HEADERS, answer_lifespan, chunk_frame, empty_response, read_body, serve
from tokenspool.bench.sim import chat_request, run_broker, sim_engine
from tokenspool.gateway.sse import DONE_FRAME
from tokenspool.shared import keys

QUEUE = "lean-broker:queue"
GROUP = "workers"
STREAM_TTL_MS = 600_000
READ_BLOCK_MS = 1_000  # under redis-py's socket timeout: an idle read comes back empty instead of failing
# KEYS: the queue, then one stream per delta; ARGV: per delta its payload and, for a request's last, its
# queue entry to acknowledge ("" otherwise).
APPEND = """
for i = 2, #KEYS do
  redis.call('XADD', KEYS[i], '*', 'd', ARGV[2 * i - 3])
  local entry = ARGV[2 * i - 2]
  if entry ~= '' then
    redis.call('PEXPIRE', KEYS[i], ARGV[#ARGV])
    redis.call('XACK', KEYS[1], 'workers', entry)
  end
end
return #KEYS - 1
"""
END = msgpack.packb((True, "", None))


def stream_name(request_id: str) -> str:
    return f"lean-broker:stream:{request_id}"


class LeanRelay:
    """One reader task: a blocking ``XREAD`` over every open stream, each entry handed to its stream's list."""

    def __init__(self, redis_url: str) -> None:
        self.reader: Any = aredis.Redis.from_url(redis_url, single_connection_client=True)
        self.control: Any = aredis.Redis.from_url(redis_url)
        self.cursors: dict[str, bytes] = {}
        self.inboxes: dict[str, tuple[list[bytes], asyncio.Event]] = {}
        self.opened = asyncio.Event()
        self.opened_count = 0  # streams opened so far
        self.reading_count = 0  # of which the read in flight names all
        self.reader_id = 0

    def open(self, name: str) -> tuple[list[bytes], asyncio.Event]:
        inbox: tuple[list[bytes], asyncio.Event] = ([], asyncio.Event())
        self.inboxes[name], self.cursors[name] = inbox, b"0"
        self.opened_count += 1
        self.opened.set()
        return inbox

    async def wake(self) -> None:
        """Until a read names every open stream: unblock the read in flight (it may not have reached Redis
        yet when this runs, so an unblock that found nothing blocked is tried again after the reader ran)."""
        wanted = self.opened_count
        while self.reading_count < wanted:
            if not await self.control.execute_command("CLIENT", "UNBLOCK", self.reader_id):
                await asyncio.sleep(0)

    def close(self, name: str) -> None:
        del self.inboxes[name], self.cursors[name]

    async def run(self) -> None:
        self.reader_id = await self.reader.client_id()
        while True:
            if not self.cursors:
                self.opened.clear()
                await self.opened.wait()
            self.reading_count = self.opened_count
            reply = await self.reader.xread(dict(self.cursors), block=READ_BLOCK_MS)
            for key, entries in reply or ():
                name = key.decode()
                if name not in self.inboxes:
                    continue
                items, ready = self.inboxes[name]
                for entry_id, fields in entries:
                    items.append(fields[b"d"])
                    self.cursors[name] = entry_id
                ready.set()


def _exit_unless_cancelled(task: asyncio.Task[None]) -> None:
    """Without its reader (gateway) or its sender (worker) a process would hang every stream: end it, so
    the benchmark says so."""
    if not task.cancelled():
        print(f"lean broker: {task.get_name()} stopped: {task.exception()!r}", file=sys.stderr, flush=True)
        os._exit(70)


class LeanGateway:
    """``POST /v1/chat/completions`` (stream only) and ``GET /healthz``, like the floor, over Redis."""

    def __init__(self, redis_url: str) -> None:
        self.client: Any = aredis.Redis.from_url(redis_url, max_connections=100_000)
        self.relay = LeanRelay(redis_url)
        self.reader: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            self.reader = asyncio.create_task(self.relay.run(), name="the reader")
            self.reader.add_done_callback(_exit_unless_cancelled)
            await answer_lifespan(receive, send)
            self.reader.cancel()
            return
        if scope["path"] != "/v1/chat/completions" or scope["method"] != "POST":
            await empty_response(send, 200 if scope["path"] == "/healthz" else 404)
            return
        raw = await read_body(receive)
        model = orjson.loads(raw)["model"]
        request_id = keys.new_request_id("chat")
        name = stream_name(request_id)
        items, ready = self.relay.open(name)
        try:
            await self.client.xadd(QUEUE, {"id": request_id, "body": raw})
            await self.relay.wake()
            await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
            base = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
            seq = 0
            while True:
                await ready.wait()
                ready.clear()
                batch = items[:]
                items.clear()
                for payload in batch:
                    done, text, finish_reason = msgpack.unpackb(payload)
                    if done:
                        await send({"type": "http.response.body", "body": DONE_FRAME, "more_body": False})
                        return
                    seq += 1
                    frame = chunk_frame(base, seq, text, finish_reason)
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
        finally:
            self.relay.close(name)


class LeanOutbox:
    """Deltas waiting for the next script call; one sender task, so each stream's deltas stay in order."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.append = client.register_script(APPEND)
        self.streams: list[str] = [QUEUE]
        self.args: list[bytes | str] = []
        self.waiting = asyncio.Event()

    def put(self, name: str, payload: bytes, ack: bytes | str = "") -> None:
        self.streams.append(name)
        self.args += (payload, ack)
        self.waiting.set()

    async def run(self) -> None:
        while True:
            await self.waiting.wait()
            self.waiting.clear()
            streams, args = self.streams, self.args
            self.streams, self.args = [QUEUE], []
            await self.append(keys=streams, args=[*args, STREAM_TTL_MS])


async def run_worker(redis_url: str, consumer: str, sim_ttft_ms: str, sim_itl_ms: str) -> None:
    engine = sim_engine(sim_ttft_ms, sim_itl_ms)
    client: Any = aredis.Redis.from_url(redis_url)
    with contextlib.suppress(aredis.ResponseError):  # another worker created it
        await client.xgroup_create(QUEUE, GROUP, id="0", mkstream=True)
    outbox = LeanOutbox(client)
    sender = asyncio.create_task(outbox.run(), name="the sender")
    sender.add_done_callback(_exit_unless_cancelled)
    running: set[asyncio.Task[None]] = {sender}

    async def generate(entry_id: bytes, request_id: str, body: dict[str, Any]) -> None:
        name = stream_name(request_id)
        async for delta in engine.generate(chat_request(request_id, body)):
            outbox.put(name, msgpack.packb((False, delta.text, delta.finish_reason)))
        outbox.put(name, END, entry_id)

    while True:
        reply = await client.xreadgroup(GROUP, consumer, {QUEUE: ">"}, count=100, block=1000)
        for _key, entries in reply or ():
            for entry_id, fields in entries:
                job = generate(entry_id, fields[b"id"].decode(), orjson.loads(fields[b"body"]))
                task = asyncio.create_task(job)
                running.add(task)
                task.add_done_callback(running.discard)


def _serve_gateway(redis_url: str, port: int) -> None:
    serve(LeanGateway(redis_url), port)


def main(argv: list[str] | None = None) -> None:
    run_broker("tokenspool.bench.lean", __doc__, argv, run_worker, _serve_gateway)


if __name__ == "__main__":
    main()
