"""A worker's takeover scan, in-process against a real embedded server: what it counts as an attempt.

``XAUTOCLAIM`` counts a delivery on every entry it claims, and that count decides a dead letter. A scan can
claim entries the scanning worker holds all along (it paused past its lease timeout, or it just gave a
request up and that request's task has not ended): such a claim is no attempt."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import cast

from tests.support import plain_job
from tokenspool.redis_server import EmbeddedCluster, EmbeddedRedis
from tokenspool.shared import keys
from tokenspool.shared.queue import ModelQueue, QueueEntry
from tokenspool.shared.redis_client import RedisTarget, connect
from tokenspool.shared.store import RequestStore
from tokenspool.worker.leases import Leases
from tokenspool.worker.metrics import WorkerMetrics
from tokenspool.worker.runner import RequestRunner
from tokenspool.worker.running import RunningRequest, RunningRequests
from tokenspool.worker.settings import WorkerSettings

MODEL = "leases-model"


@dataclass
class StartedRequests:
    """Stands in for the runner, which the scan calls only to start what it took over: records it."""

    taken_over: list[bytes] = field(default_factory=list)

    def start(self, entry: QueueEntry, *, takeover: bool = False) -> None:
        assert takeover
        self.taken_over.append(entry.entry_id)


def test_a_scan_that_meets_its_own_entry_uses_up_no_attempt(redis_server: EmbeddedRedis | EmbeddedCluster) -> None:
    async def main() -> None:
        client = connect(RedisTarget(redis_server.url), name="tokenspool:test:leases", max_connections=4)
        try:
            settings = WorkerSettings(redis_url=redis_server.url, lease_timeout_s=1.0, worker_heartbeat_s=0.2)
            store = RequestStore(client, settings)
            await store.load_scripts()
            queue = ModelQueue(client, client, MODEL, consumer="w1")
            await queue.ensure_group()
            for job in (plain_job(MODEL), plain_job(MODEL)):
                await store.create(job, stream_format="chat", owner="tester", include_usage=False)
            ours, abandoned = await queue.read_new(2, 1000)
            # Both look idle past the lease timeout (JUSTID: without counting a delivery); the second is held
            # by a worker that died.
            await client.xclaim(queue.key, keys.WORKER_GROUP, "w1", 0, [ours.entry_id], idle=5000, justid=True)
            await client.xclaim(queue.key, keys.WORKER_GROUP, "w0", 0, [abandoned.entry_id], idle=5000, justid=True)
            # The scan claims nothing while the server has been up for less than a lease timeout.
            while (await client.info("server"))["uptime_in_seconds"] < 1:  # noqa: ASYNC110 (no event for uptime)
                await asyncio.sleep(0.05)

            running = RunningRequests(capacity=4)
            assert ours.job is not None
            running.add(RunningRequest(entry_id=ours.entry_id, job=ours.job))
            started = StartedRequests()
            leases = Leases(settings, "w1", store, queue, running, cast(RequestRunner, started), WorkerMetrics(MODEL))
            await leases.take_over_abandoned()

            pending = await client.xpending_range(queue.key, keys.WORKER_GROUP, min="-", max="+", count=10)
            delivered = {entry["message_id"]: entry["times_delivered"] for entry in pending}
            owner = {entry["message_id"]: entry["consumer"] for entry in pending}
            assert started.taken_over == [abandoned.entry_id], "the dead worker's request is taken over"
            assert delivered[abandoned.entry_id] == 2 and owner[abandoned.entry_id] == b"w1", "a takeover counts"
            assert delivered[ours.entry_id] == 1, "meeting its own entry is no attempt"
            assert owner[ours.entry_id] == b"w1"
        finally:
            await client.aclose()

    asyncio.run(main())
