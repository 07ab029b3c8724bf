"""Group commit (shared/aio.py): calls made while a round trip is in flight go together in the next one; the
worker's claims and acknowledgements use it, against a real embedded server."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import plain_job
from tokenspool.redis_server import EmbeddedCluster, EmbeddedRedis
from tokenspool.shared import keys
from tokenspool.shared.aio import GroupCommit
from tokenspool.shared.queue import ModelQueue
from tokenspool.shared.redis_client import RedisTarget, connect
from tokenspool.shared.store import RequestStore
from tokenspool.worker.settings import WorkerSettings

MODEL = "group-commit-model"


def test_calls_made_together_go_in_one_round_trip_and_later_ones_in_the_next() -> None:
    async def scenario() -> None:
        sent: list[list[int]] = []
        in_flight = asyncio.Event()
        release = asyncio.Event()

        async def send(items: list[int]) -> list[int | Exception]:
            sent.append(items)
            in_flight.set()
            await release.wait()
            return [ValueError("odd") if item % 2 else item * 10 for item in items]

        commit: GroupCommit[int, int] = GroupCommit(send, "test")
        first = [asyncio.create_task(commit(i)) for i in (0, 2, 4)]
        await in_flight.wait()
        later = [asyncio.create_task(commit(i)) for i in (6, 7)]
        await asyncio.sleep(0)
        assert sent == [[0, 2, 4]], "the later calls wait for the round trip in flight"
        release.set()
        assert await asyncio.gather(*first) == [0, 20, 40]
        assert await later[0] == 60
        with pytest.raises(ValueError, match="odd"):
            await later[1]
        assert sent == [[0, 2, 4], [6, 7]]

    asyncio.run(scenario())


def test_a_failed_round_trip_fails_each_of_its_calls_and_the_next_call_starts_a_new_one() -> None:
    async def scenario() -> None:
        calls = 0

        async def send(items: list[int]) -> list[int | Exception]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ConnectionError("down")
            return items

        commit: GroupCommit[int, int] = GroupCommit(send, "test")
        results = await asyncio.gather(commit(1), commit(2), return_exceptions=True)
        assert [type(r) for r in results] == [ConnectionError, ConnectionError]
        assert await commit(3) == 3

    asyncio.run(scenario())


async def queue_requests(store: RequestStore, count: int) -> None:
    for _ in range(count):
        job = plain_job(MODEL)
        await store.create(job, stream_format="chat", owner="tester", include_usage=False)


def test_claims_and_acknowledgements_made_together_each_take_their_own_request(
    redis_server: EmbeddedRedis | EmbeddedCluster,
) -> None:
    async def scenario() -> None:
        url = redis_server.url
        client = connect(RedisTarget(url), name="tokenspool:test:group-commit", max_connections=1)
        pull = connect(RedisTarget(url), name="tokenspool:test:group-commit-queue", max_connections=1)
        try:
            store = RequestStore(client, WorkerSettings(redis_url=url))
            queue = ModelQueue(client, pull, MODEL, "w1")
            await queue.ensure_group()
            await store.load_scripts()
            await queue_requests(store, 6)
            entries = await queue.read_new(6, 1000)
            assert len(entries) == 6
            await client.script_flush()  # the first round trip meets NOSCRIPT: loaded, then sent again
            claims = await asyncio.gather(
                *(store.claim(e.job.request_id, "w1", e.entry_id) for e in entries if e.job is not None)
            )
            assert claims == [(1, 0)] * 6
            again = await store.claim(entries[0].job.request_id, "w1", entries[0].entry_id)  # type: ignore[union-attr]
            assert again == (1, 0), "a claim sent again by its worker answers like the first"
            other = await store.claim(entries[1].job.request_id, "w2", entries[1].entry_id)  # type: ignore[union-attr]
            assert other == (0, 0), "a running request is not taken by another worker"
            await asyncio.gather(*(queue.finish(e.entry_id) for e in entries))
            assert await client.xlen(queue.key) == 0
            assert (await client.xpending(queue.key, keys.WORKER_GROUP))["pending"] == 0
        finally:
            await client.aclose()
            await pull.aclose()

    asyncio.run(scenario())
