"""The worker service: pull requests for one model within capacity, run them, publish their events.

The parts, one module each (in :mod:`tokenspool.worker`): ``running`` (what the worker holds), ``runner``
(one request from claim to acknowledgement), ``outbox`` (the group-committed writes), ``policies`` (cancel
flags, unattended requests, deadlines), ``leases`` (renewal, migration, takeover, dead letters), ``commands``
(operator commands) and ``periodic`` (each periodic job in a loop of its own). The queue itself is
:mod:`tokenspool.shared.queue`'s. This module wires
them together and runs the worker's life: register, pull until told to stop, drain, deregister.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

import redis.exceptions

from tokenspool.shared import registry, wire
from tokenspool.shared.aio import reraise_if_cancelling
from tokenspool.shared.queue import ModelQueue
from tokenspool.shared.redis_client import AsyncRedis
from tokenspool.shared.store import RequestStore, now_ms
from tokenspool.worker import policies
from tokenspool.worker.commands import OperatorCommands
from tokenspool.worker.engines.base import Engine, EngineDeadError
from tokenspool.worker.leases import Leases
from tokenspool.worker.metrics import WorkerMetrics
from tokenspool.worker.outbox import Outbox
from tokenspool.worker.periodic import PeriodicJob, every
from tokenspool.worker.runner import RequestRunner
from tokenspool.worker.running import RunningRequests
from tokenspool.worker.settings import WorkerSettings
from tokenspool.worker.tasks import Chores

log = logging.getLogger("tokenspool.worker")

PULL_BLOCK_MS = 1000
CHORES_GRACE_S = 5.0


class Worker:
    """Runs requests from the model's queue on one engine until told to stop."""

    def __init__(
        self, settings: WorkerSettings, engine: Engine, client: AsyncRedis, pull_client: AsyncRedis, worker_id: str
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.worker_id = worker_id
        self._client = client
        self.metrics = WorkerMetrics(engine.model_name)
        self.metrics.capacity.set(engine.capacity)
        self.store = RequestStore(client, settings)
        self.queue = ModelQueue(client, pull_client, engine.model_name, worker_id)
        self.outbox = Outbox(
            self.store,
            stream_maxlen=settings.stream_maxlen,
            max_unflushed=settings.max_unflushed_events,
            observe_flush=self.metrics.redis_write.observe,
            observe_lost=self.metrics.redis_lost_events.inc,
        )
        self.running = RunningRequests(engine.capacity)
        self._chores = Chores()
        self.runner = RequestRunner(
            settings, worker_id, engine, self.store, self.queue, self.outbox, self.running, self.metrics, self._chores
        )
        self.leases = Leases(settings, worker_id, self.store, self.queue, self.running, self.runner, self.metrics)
        self._commands = OperatorCommands(client, worker_id, drain=self._request_drain, shed=self._shed)
        self._started_ms = now_ms()
        self._state: wire.WorkerState = "active"
        self._stop = asyncio.Event()
        self._migrate_on_drain = False

    def info(self) -> wire.WorkerInfo:
        return wire.WorkerInfo(
            worker_id=self.worker_id,
            model=self.engine.model_name,
            engine=self.engine.name,
            capacity=self.engine.capacity,
            running=len(self.running),
            state=self._state,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_ms=self._started_ms,
            heartbeat_ms=now_ms(),
            owned_by=self.engine.owned_by,
            max_model_len=self.engine.max_model_len,
            unsupported=tuple(sorted(self.engine.unsupported)),
            engine_running=self.engine.running_requests(),
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Pull and run requests until ``stop`` is set, an operator drains this worker, or the engine dies
        (then EngineDeadError, in an exception group); then drain and deregister."""
        await self.queue.ensure_group()
        await self.store.load_scripts()  # so that the first pipelined append does not meet NOSCRIPT
        await registry.publish(self._client, self.info())
        log.info(
            "worker %s serving model %r with engine %s (capacity %d)",
            self.worker_id,
            self.engine.model_name,
            self.engine.name,
            self.engine.capacity,
        )
        async with asyncio.TaskGroup() as group:
            helpers = [group.create_task(self.outbox.run(), name="outbox flusher")]
            helpers += [
                group.create_task(every(self.settings.worker_heartbeat_s, job), name=job.name)
                for job in self._periodic_jobs()
            ]
            try:
                await self._serve_until(stop)
                self._state = "draining"
                await self._drain()
            finally:
                self._state = "stopped"
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    await registry.publish(self._client, self.info())
                for task in helpers:
                    task.cancel()
            await self._chores.wait(CHORES_GRACE_S)

    def _periodic_jobs(self) -> list[PeriodicJob]:
        """The heartbeat's jobs, each in a loop of its own (a failing one skips none of the others)."""
        return [
            PeriodicJob("engine check", self._check_engine),
            PeriodicJob("registry heartbeat", self._publish),
            PeriodicJob("queue depth metric", self._measure_queue),
            PeriodicJob("operator commands", self._commands.poll),
            PeriodicJob("lease renewal", self.leases.renew),
            PeriodicJob("cancel flags", lambda: policies.stop_cancelled(self.running, self.store)),
            PeriodicJob(
                "unattended requests", lambda: policies.stop_unattended(self.running, self.store, self.settings)
            ),
            PeriodicJob("deadlines", self._enforce_deadlines),
            PeriodicJob("takeover", self._take_over),
        ]

    async def _serve_until(self, stop: asyncio.Event) -> None:
        """Pull until ``stop`` (or the drain command) is set; raises the engine failure that ends pulling."""
        puller = asyncio.create_task(self._pull(), name="queue pull")
        stoppers = {asyncio.create_task(stop.wait()), asyncio.create_task(self._stop.wait())}
        try:
            await asyncio.wait({puller, *stoppers}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (puller, *stoppers):
                task.cancel()
            await asyncio.wait({puller, *stoppers})
        if not puller.cancelled() and (failure := puller.exception()) is not None:
            raise failure

    async def _pull(self) -> None:
        while True:
            free = await self.running.room()  # raises the engine failure once the engine died
            try:
                entries = await self.queue.read_new(free, PULL_BLOCK_MS)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                reraise_if_cancelling()
                log.warning("queue read failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            for entry in entries:
                self.runner.start(entry)

    async def _check_engine(self) -> None:
        reason = self.engine.dead()
        if reason is not None and self.running.failure is None:
            log.error("%s", reason)
            self.running.close(EngineDeadError(reason))  # the pull loop stops, and with it the worker

    async def _publish(self) -> None:
        await registry.publish(self._client, self.info())
        self.metrics.running.set(len(self.running))

    async def _measure_queue(self) -> None:
        self.metrics.waiting.set(await self.queue.waiting())

    async def _enforce_deadlines(self) -> None:
        policies.stop_overdue(self.running, self.settings)

    async def _take_over(self) -> None:
        if self._state == "active":
            await self.leases.take_over_abandoned()

    def _request_drain(self, migrate: bool) -> None:
        self._migrate_on_drain = migrate
        self._state = "draining"
        self._stop.set()

    async def _shed(self, count: int) -> int:
        return await self.leases.release(self.running.ids()[:count])

    async def _drain(self) -> None:
        if self._migrate_on_drain:
            await self.leases.release(self.running.ids())
        tasks = [r.task for r in self.running if r.task is not None]
        if not tasks:
            return
        log.info("draining: waiting up to %.1fs for %d running requests", self.settings.drain_timeout_s, len(tasks))
        _done, pending = await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("drain timeout: %d requests left unfinished in the queue's pending list", len(pending))
            await asyncio.wait(pending)
