"""The worker's outbox on its rare paths, in-process against a real embedded server: an append whose reply
was lost (the script answers "out of sequence"), a writer that is no longer in sequence at all, a server
that forgot the append script (NOSCRIPT, provoked with SCRIPT FLUSH), and a client's cancel flag picked up
from an append's reply."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from tests.support import plain_job
from tokenspool.redis_server import EmbeddedCluster, EmbeddedRedis
from tokenspool.shared import wire
from tokenspool.shared.keys import RequestKeys, queue_key
from tokenspool.shared.redis_client import AsyncRedis, RedisTarget, connect
from tokenspool.shared.store import Append, RequestStore
from tokenspool.worker.outbox import Ending, Outbox, RequestLog, RequestLostError
from tokenspool.worker.settings import WorkerSettings

MODEL = "outbox-model"


@dataclass
class Bench:
    client: AsyncRedis
    store: RequestStore
    outbox: Outbox

    async def running_request(self) -> tuple[str, int]:
        """A request claimed by worker "w1": (request id, attempt)."""
        job = plain_job(MODEL)
        await self.store.create(job, stream_format="chat", owner="tester", include_usage=False)
        attempt, last_seq = await self.store.claim(job.request_id, "w1")
        assert attempt == 1 and last_seq == 0
        return job.request_id, attempt

    async def stored_texts(self, request_id: str) -> list[tuple[int, str]]:
        return [
            (seq, wire.decode(payload, wire.Event).text)
            for seq, payload in await self.store.read_events(request_id, 0, 100)
        ]

    async def flush_until(self, condition: Callable[[], bool], what: str) -> None:
        """Run the flusher until ``condition`` holds (at most 10 s)."""
        flusher = asyncio.create_task(self.outbox.run())
        try:
            async with asyncio.timeout(10):
                while not condition():  # noqa: ASYNC110 (the outbox's state has no event for every condition)
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(f"the outbox never got to: {what}") from None
        finally:
            flusher.cancel()
            await asyncio.wait({flusher})


@asynccontextmanager
async def bench(url: str) -> AsyncIterator[Bench]:
    client = connect(RedisTarget(url), name="tokenspool:test:outbox", max_connections=4)
    try:
        store = RequestStore(client, WorkerSettings(redis_url=url))
        await store.load_scripts()
        yield Bench(client, store, Outbox(store, stream_maxlen=1000, max_unflushed=64))
    finally:
        await client.aclose()


def run(redis_server: EmbeddedRedis | EmbeddedCluster, test: Callable[[Bench], Awaitable[None]]) -> None:
    async def main() -> None:
        async with bench(redis_server.url) as b:
            await test(b)

    asyncio.run(main())


def delta(text: str) -> wire.Event:
    return wire.Event("delta", text=text, token_ids=(1,))


async def put_all(outbox: Outbox, entry: RequestLog, texts: list[str]) -> None:
    for text in texts:
        await outbox.put(entry, delta(text))


def test_an_append_whose_reply_was_lost_is_resent_from_where_redis_stands(
    redis_server: EmbeddedRedis | EmbeddedCluster,
) -> None:
    async def test(b: Bench) -> None:
        request_id, attempt = await b.running_request()
        entry = b.outbox.open(request_id, attempt, 0)
        await put_all(b.outbox, entry, ["a", "b", "c", "d"])
        # An earlier round trip of this very writer wrote the first two, and its reply never came back.
        earlier = [wire.encode(delta("a")), wire.encode(delta("b"))]
        (result,) = await b.store.append_many([Append(RequestKeys.of(request_id), attempt, 1, earlier)], 1000)
        assert result == (2, 0)
        await b.flush_until(lambda: not entry.unflushed, "resend the rest")
        assert await b.stored_texts(request_id) == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
        assert not entry.lost and entry.next_seq == 5
        assert b.outbox.round_trips == 2, "one refused round trip (out of sequence), one resend"
        await b.outbox.put(entry, delta("e"))
        finishing = asyncio.create_task(b.outbox.finish(entry, Ending.finished("stop", 3, 5)))
        await b.flush_until(finishing.done, "write the ending")
        await finishing
        meta = await b.store.meta(request_id)
        assert meta is not None and meta.state == "done" and meta.last_seq == 6 and meta.completion_tokens == 5

    run(redis_server, test)


def test_a_writer_behind_what_redis_holds_loses_the_request_instead_of_writing_over_it(
    redis_server: EmbeddedRedis | EmbeddedCluster,
) -> None:
    async def test(b: Bench) -> None:
        request_id, attempt = await b.running_request()
        entry = b.outbox.open(request_id, attempt, 0)
        await put_all(b.outbox, entry, ["a", "b"])
        # Someone wrote further than anything this writer ever sent (a stale sequence: not a lost reply).
        others = [wire.encode(delta(text)) for text in "vwxyz"]
        await b.store.append_many([Append(RequestKeys.of(request_id), attempt, 1, others)], 1000)
        await b.flush_until(lambda: bool(entry.lost), "notice it is out of sequence")
        assert entry.lost == "out of sequence at 5" and entry.done.is_set() and entry.stopped.done()
        assert [text for _seq, text in await b.stored_texts(request_id)] == list("vwxyz"), "nothing overwritten"
        with pytest.raises(RequestLostError):
            await b.outbox.finish(entry, Ending.finished("stop", 1, 2))

    run(redis_server, test)


def test_a_server_that_forgot_the_append_script_gets_it_again_and_nothing_is_lost_or_doubled(
    redis_server: EmbeddedRedis | EmbeddedCluster, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(b: Bench) -> None:
        request_id, attempt = await b.running_request()
        entry = b.outbox.open(request_id, attempt, 0)
        await put_all(b.outbox, entry, ["a", "b"])
        await b.flush_until(lambda: not entry.unflushed, "write the first events")
        assert b.outbox.round_trips == 1
        await b.client.script_flush()  # what a restarted node, or the new owner of a slot, knows
        await put_all(b.outbox, entry, ["c", "d"])
        with caplog.at_level(logging.INFO, logger="tokenspool.worker.outbox"):
            await b.flush_until(lambda: not entry.unflushed, "reload the script and resend")
        assert "did not know the append script" in caplog.text
        assert b.outbox.round_trips == 3, "one answered NOSCRIPT, the resend after loading the scripts"
        assert await b.stored_texts(request_id) == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
        assert not entry.lost

    run(redis_server, test)


def test_a_cancel_flag_reaches_the_request_through_the_reply_of_its_next_append(
    redis_server: EmbeddedRedis | EmbeddedCluster,
) -> None:
    async def test(b: Bench) -> None:
        request_id, attempt = await b.running_request()
        entry = b.outbox.open(request_id, attempt, 0)
        code, state = await b.store.cancel(request_id, "tester")
        assert (code, state) == (2, "running"), "a running request is flagged for its worker"
        await b.outbox.put(entry, delta("a"))
        await b.flush_until(entry.stopped.done, "pass the flag on")
        assert entry.stop == Ending.cancelled() and not entry.lost

    run(redis_server, test)


def test_a_create_sent_again_neither_undoes_the_workers_progress_nor_runs_the_request_twice(
    redis_server: EmbeddedRedis | EmbeddedCluster,
) -> None:
    """The gateway's create is one script call (``create.lua``); redis-py sends it again when its reply is
    lost to a broken connection, perhaps after a worker claimed the request and wrote to it. The second call
    must leave the worker's progress as it stands, and its second queue entry must not be taken. It also
    runs on a server that forgot the script (SCRIPT FLUSH: a restart or a failover)."""

    async def test(b: Bench) -> None:
        await b.client.script_flush()
        job = plain_job(MODEL)
        await b.store.create(job, stream_format="chat", owner="tester", include_usage=False)
        attempt, _ = await b.store.claim(job.request_id, "w1", b"1-0")
        (result,) = await b.store.append_many(
            [Append(RequestKeys.of(job.request_id), attempt, 1, [wire.encode(delta("a")), wire.encode(delta("b"))])],
            1000,
        )
        assert result == (2, 0)
        written = await b.store.create(job, stream_format="chat", owner="tester", include_usage=False)
        assert written.state == "queued", "what the gateway wrote, as the create answers it"
        meta = await b.store.meta(job.request_id)
        assert meta is not None and (meta.state, meta.attempt, meta.last_seq) == ("running", 1, 2)
        assert await b.client.xlen(queue_key(MODEL)) >= 2, "both calls enqueued it"
        assert await b.store.claim(job.request_id, "w2", b"2-0") == (0, 0), "the second entry is not taken"
        assert await b.stored_texts(job.request_id) == [(1, "a"), (2, "b")]

    run(redis_server, test)
