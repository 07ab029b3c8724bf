"""The worker service: pull requests for one model within capacity, run them, publish their events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
from typing import Any

import redis.asyncio as aredis
import redis.exceptions

from shared import keys, registry, wire
from shared.settings import WorkerSettings
from shared.store import FinalState, RequestStore, now_ms
from worker.engines.base import Engine, EngineDeadError, EngineError, EngineRequest
from worker.outbox import Outbox, RequestLog, RequestLostError

log = logging.getLogger("tokenspool.worker")

PULL_BLOCK_MS = 1000


class Worker:
    """Runs requests from the model's queue on one engine until told to stop.

    Capacity is the engine's: the worker asks the consumer group for at most as many requests as it has
    free slots, so several workers share a model's load by pulling, and a busy worker leaves new requests
    in the queue for an idle one.
    """

    def __init__(
        self, settings: WorkerSettings, engine: Engine, client: aredis.Redis, pull_client: aredis.Redis, worker_id: str
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.worker_id = worker_id
        self._client = client
        self._pull: Any = pull_client
        self.store = RequestStore(client, settings)
        self.outbox = Outbox(
            self.store, stream_maxlen=settings.stream_maxlen, max_unflushed=settings.max_unflushed_events
        )
        self.queue = keys.queue_key(engine.model_name)
        self._running: dict[str, tuple[asyncio.Task[None], RequestLog | None]] = {}
        self._slot_freed = asyncio.Event()
        self._housekeeping: set[asyncio.Task[None]] = set()
        self._started_ms = now_ms()
        self._state: wire.WorkerState = "active"
        self.engine_failure: BaseException | None = None

    def info(self) -> wire.WorkerInfo:
        return wire.WorkerInfo(
            worker_id=self.worker_id,
            model=self.engine.model_name,
            engine=self.engine.name,
            capacity=self.engine.capacity,
            running=len(self._running),
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
        """Pull and run requests until ``stop`` is set or the engine dies; then drain and deregister."""
        await self._ensure_group()
        await registry.publish(self._client, self.info())
        log.info(
            "worker %s serving model %r with engine %s (capacity %d)",
            self.worker_id,
            self.engine.model_name,
            self.engine.name,
            self.engine.capacity,
        )
        async with asyncio.TaskGroup() as background:
            flusher = background.create_task(self.outbox.run())
            heartbeat = background.create_task(self._heartbeat())
            try:
                puller = asyncio.create_task(self._pull_loop())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({puller, stopper}, return_when=asyncio.FIRST_COMPLETED)
                for task in (puller, stopper):
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await puller
                if puller.done() and not puller.cancelled() and puller.exception() is not None:
                    raise puller.exception()  # type: ignore[misc]
                self._state = "draining"
                await self._drain()
            finally:
                self._state = "stopped"
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    await registry.publish(self._client, self.info())
                heartbeat.cancel()
                flusher.cancel()

    async def _ensure_group(self) -> None:
        try:
            await self._client.xgroup_create(self.queue, keys.WORKER_GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _pull_loop(self) -> None:
        while self.engine_failure is None:
            free = self.engine.capacity - len(self._running)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                reply = await self._pull.xreadgroup(
                    keys.WORKER_GROUP, self.worker_id, {self.queue: ">"}, count=free, block=PULL_BLOCK_MS
                )
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                log.warning("queue read failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    self._start(entry_id, fields)
        raise self.engine_failure

    def _start(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            job = wire.decode(fields[b"d"], wire.Job)
        except (KeyError, wire.WireError) as exc:
            log.error("dropping undecodable queue entry %s: %s", entry_id, exc)
            cleanup = asyncio.create_task(self.store.finish_queue_entry(self.engine.model_name, entry_id))
            self._housekeeping.add(cleanup)
            cleanup.add_done_callback(self._housekeeping.discard)
            return
        task = asyncio.create_task(self._handle(entry_id, job), name=f"request {job.request_id}")
        self._running[job.request_id] = (task, None)
        task.add_done_callback(functools.partial(self._finished, job.request_id))

    def _finished(self, request_id: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(request_id, None)
        self._slot_freed.set()

    async def _handle(self, entry_id: bytes, job: wire.Job) -> None:
        request_id = job.request_id
        attempt, last_seq = await self.store.claim(request_id, self.worker_id)
        if attempt == 0:
            log.info("request %s is no longer queued; skipping it", request_id)
            await self.store.finish_queue_entry(job.model, entry_id)
            return
        entry = self.outbox.open(request_id, attempt, last_seq)
        self._running[request_id] = (self._running[request_id][0], entry)
        log.info("request %s started (attempt %d)", request_id, attempt)
        generation = asyncio.create_task(self._generate(job, entry))

        def interrupt_generation() -> None:
            generation.cancel()

        entry.on_cancel = interrupt_generation
        try:
            final_event, final = await generation
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                generation.cancel()
                raise
            if entry.lost:
                log.info("request %s abandoned: %s", request_id, entry.lost)
                await self.store.finish_queue_entry(job.model, entry_id)
                return
            message = "cancelled by the client"
            final_event = wire.Event("error", error_type="cancelled", message=message)
            final = FinalState("cancelled", error=message)
        except RequestLostError:
            log.info("request %s abandoned: %s", request_id, entry.lost)
            await self.store.finish_queue_entry(job.model, entry_id)
            return
        except EngineError as exc:
            final_event = wire.Event("error", error_type="engine_error", message=str(exc))
            final = FinalState("failed", error=str(exc))
        except EngineDeadError as exc:
            log.error("engine died while running %s: %s", request_id, exc)
            self.engine_failure = exc
            raise
        with contextlib.suppress(RequestLostError):
            await self.outbox.put(entry, final_event, final)
            await entry.done.wait()
        await self.store.finish_queue_entry(job.model, entry_id)
        log.info("request %s %s (%s)", request_id, final.state, final.finish_reason or final.error)

    async def _generate(self, job: wire.Job, entry: RequestLog) -> tuple[wire.Event, FinalState]:
        request = EngineRequest(
            request_id=job.request_id, kind=job.kind, prompt=job.prompt, messages=job.messages, sampling=job.sampling
        )
        prompt_tokens = completion_tokens = text_offset = 0
        finish_reason = "stop"
        wants_logprobs = job.sampling.logprobs is not None
        stream = self.engine.generate(request)
        try:
            async for delta in stream:
                prompt_tokens = delta.prompt_tokens
                completion_tokens += len(delta.token_ids)
                if delta.finish_reason:
                    finish_reason = delta.finish_reason
                if delta.text or delta.token_ids or delta.finish_reason:
                    event = wire.Event("delta", delta.text, delta.token_ids, delta.finish_reason)
                    if wants_logprobs:
                        event = dataclasses.replace(event, logprobs=delta.logprobs, text_offset=text_offset)
                    text_offset += len(delta.text)
                    await self.outbox.put(entry, event)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return (
            wire.Event(
                "end", finish_reason=finish_reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
            ),
            FinalState("done", finish_reason, prompt_tokens, completion_tokens),
        )

    async def _heartbeat(self) -> None:
        """Refresh the registry entry and pick up cancellations of requests that emit nothing yet."""
        while True:
            await asyncio.sleep(self.settings.worker_heartbeat_s)
            try:
                await registry.publish(self._client, self.info())
                flags = await self.store.cancel_flags(list(self._running))
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            for request_id, flagged in flags.items():
                running = self._running.get(request_id)
                if flagged and running is not None and running[1] is not None:
                    running[1].request_cancel()

    async def _drain(self) -> None:
        tasks = [task for task, _ in self._running.values()]
        if not tasks:
            return
        log.info("draining: waiting up to %.1fs for %d running requests", self.settings.drain_timeout_s, len(tasks))
        _done, pending = await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("drain timeout: %d requests left unfinished in the queue's pending list", len(pending))
            await asyncio.wait(pending)
