"""The worker service: pull requests for one model within capacity, run them, publish their events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import redis.exceptions

from shared import keys, registry, wire
from shared.aio import reraise_if_cancelling
from shared.logs import about, content
from shared.redis_client import AsyncRedis
from shared.settings import WorkerSettings
from shared.store import FinalState, RequestStore, now_ms
from worker.engines.base import Engine, EngineDeadError, EngineError, EngineRequest
from worker.metrics import WorkerMetrics
from worker.outbox import Outbox, RequestLog, RequestLostError

log = logging.getLogger("tokenspool.worker")

PULL_BLOCK_MS = 1000


@dataclass(eq=False)
class RunningRequest:
    """A request this worker holds: its queue entry (the lease), its task, and its write side."""

    entry_id: bytes
    task: asyncio.Task[None] | None = None
    log: RequestLog | None = None
    background: bool = False
    enqueued_ms: int = 0


class Worker:
    """Runs requests from the model's queue on one engine until told to stop.

    Capacity is the engine's: the worker asks the consumer group for at most as many requests as it has
    free slots, so several workers share a model's load by pulling, and a busy worker leaves new requests
    in the queue for an idle one.
    """

    def __init__(
        self, settings: WorkerSettings, engine: Engine, client: AsyncRedis, pull_client: AsyncRedis, worker_id: str
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
        self._running: dict[str, RunningRequest] = {}
        self._slot_freed = asyncio.Event()
        self._housekeeping: set[asyncio.Task[None]] = set()
        self._started_ms = now_ms()
        self._state: wire.WorkerState = "active"
        self._stop: asyncio.Event | None = None
        self._closing = False
        self._migrate_on_drain = False
        self._no_takeover_until = 0.0
        self.engine_failure: BaseException | None = None
        self.metrics = WorkerMetrics(engine.model_name)
        self.metrics.capacity.set(engine.capacity)
        self.outbox.observe_flush = self.metrics.redis_write.observe

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
        self._stop = stop
        await self._ensure_group()
        await self.store.load_scripts()  # so that the first pipelined append does not meet NOSCRIPT
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
                self._closing = True
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
                reraise_if_cancelling()
                log.warning("queue read failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("the queue or its consumer group vanished (Redis lost its data?); recreating it")
                await self._ensure_group()
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    self._start(entry_id, fields)
        raise self.engine_failure

    def _start(self, entry_id: bytes, fields: dict[bytes, bytes] | None, *, takeover: bool = False) -> None:
        try:
            if fields is None:
                raise wire.WireError("the entry was deleted")
            job = wire.decode(fields[b"d"], wire.Job)
        except (KeyError, wire.WireError) as exc:
            log.error("dropping undecodable queue entry %s: %s", entry_id, exc)
            self._background(self.store.finish_queue_entry(self.engine.model_name, entry_id))
            return
        running = RunningRequest(entry_id=entry_id, background=job.background, enqueued_ms=job.enqueued_ms)
        self._running[job.request_id] = running
        running.task = asyncio.create_task(self._handle(running, job, takeover), name=f"request {job.request_id}")
        running.task.add_done_callback(functools.partial(self._finished, job.request_id))

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._housekeeping.add(task)
        task.add_done_callback(self._housekeeping.discard)

    def _finished(self, request_id: str, task: asyncio.Task[None]) -> None:
        running = self._running.get(request_id)
        if running is not None and running.task is task:
            del self._running[request_id]
        self._slot_freed.set()

    async def _handle(self, running: RunningRequest, job: wire.Job, takeover: bool) -> None:
        request_id = job.request_id
        entry_id = running.entry_id
        waited_s = (now_ms() - job.enqueued_ms) / 1000
        if not takeover and waited_s > self.settings.queue_timeout_s:
            message = f"timed out after {waited_s:.1f}s in the queue (queue timeout {self.settings.queue_timeout_s:g}s)"
            await self.store.expire_queued(request_id, message)
            await self.store.finish_queue_entry(job.model, entry_id)
            log.info("request %s: %s", request_id, message, extra=about(request_id))
            return
        attempt, last_seq = await self.store.claim(request_id, self.worker_id, takeover=takeover)
        if attempt:
            self.metrics.claims.inc()
        if attempt and not takeover:
            self.metrics.queue_wait.observe(max(0.0, waited_s))
        if attempt and takeover:
            self.metrics.takeovers.inc()
        if attempt == 0:
            log.info(
                "request %s can no longer be taken (cancelled, ended or expired); skipping it",
                request_id,
                extra=about(request_id),
            )
            await self.store.finish_queue_entry(job.model, entry_id)
            return
        emitted: list[wire.Event] = []
        if takeover:
            emitted = [e for e in await self.store.all_events(request_id) if e.kind == "delta"]
        entry = self.outbox.open(request_id, attempt, last_seq)
        running.log = entry
        if takeover:
            log.warning(
                "request %s taken over at event %d (attempt %d)", request_id, last_seq, attempt, extra=about(request_id)
            )
            handover = f"continued by worker {self.worker_id} after event {last_seq} (attempt {attempt})"
            await self.outbox.put(entry, wire.Event("handover", message=handover))
        else:
            log.info("request %s started (attempt %d)", request_id, attempt, extra=about(request_id))
        if self.settings.log_content:
            prompt = job.prompt or "\n".join(f"{m.role}: {m.content}" for m in job.messages)
            log.info("request %s prompt: %s", request_id, content(prompt), extra=about(request_id))
        generation = asyncio.create_task(self._generate(job, entry, emitted))

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
                self._abandon(job, running, entry)
                return
            message = entry.cancel_reason or "cancelled by the client"
            final_event = wire.Event("error", error_type=entry.cancel_type, message=message)
            final = FinalState(entry.cancel_state, error=message)  # type: ignore[arg-type]
        except RequestLostError:
            self._abandon(job, running, entry)
            return
        except EngineError as exc:
            final_event = wire.Event("error", error_type="engine_error", message=str(exc))
            final = FinalState("failed", error=str(exc))
        except EngineDeadError as exc:
            log.error("engine died while running %s: %s", request_id, exc, extra=about(request_id))
            self.engine_failure = exc
            raise
        try:
            await self.outbox.put(entry, final_event, final)
            await entry.done.wait()
        except RequestLostError:
            self._abandon(job, running, entry)
            return
        if entry.lost:
            self._abandon(job, running, entry)
            return
        await self.store.finish_queue_entry(job.model, entry_id)
        self.metrics.requests.labels(final.state).inc()
        log.info(
            "request %s %s (%s)", request_id, final.state, final.finish_reason or final.error, extra=about(request_id)
        )

    def _abandon(self, job: wire.Job, running: RunningRequest, entry: RequestLog) -> None:
        """Stop working on a request this worker no longer holds. Its queue entry is left alone: another
        worker owns it now (fenced, lease lost), or whoever ended it acknowledges it."""
        log.warning("request %s abandoned by this worker: %s", job.request_id, entry.lost, extra=about(job.request_id))
        self.metrics.requests.labels("abandoned").inc()
        if entry.lost == "gone":
            self._background(self.store.finish_queue_entry(job.model, running.entry_id))

    async def _generate(
        self, job: wire.Job, entry: RequestLog, emitted: list[wire.Event]
    ) -> tuple[wire.Event, FinalState]:
        emitted_ids = tuple(token for event in emitted for token in event.token_ids)
        request = EngineRequest(
            request_id=job.request_id,
            kind=job.kind,
            prompt=job.prompt,
            messages=job.messages,
            sampling=job.sampling,
            emitted_token_ids=emitted_ids,
        )
        prompt_tokens = 0
        completion_tokens = len(emitted_ids)
        text_offset = sum(len(event.text) for event in emitted)
        finish_reason = "stop"
        wants_logprobs = job.sampling.logprobs is not None
        # A previous holder that emitted the last token but died before closing the stream: the engine
        # still reports the prompt's length, and no second finish is streamed.
        finished_before = bool(emitted and emitted[-1].finish_reason)
        generated: list[str] | None = [] if self.settings.log_content else None
        stream = self.engine.generate(request)
        step_started = time.monotonic()
        try:
            async for delta in stream:
                now = time.monotonic()
                self.metrics.engine_step.observe(now - step_started)
                step_started = now
                prompt_tokens = delta.prompt_tokens
                completion_tokens += len(delta.token_ids)
                self.metrics.output_tokens.inc(len(delta.token_ids))
                if delta.finish_reason:
                    finish_reason = delta.finish_reason
                if delta.text or delta.token_ids or (delta.finish_reason and not finished_before):
                    event = wire.Event("delta", delta.text, delta.token_ids, delta.finish_reason)
                    if wants_logprobs:
                        event = dataclasses.replace(event, logprobs=delta.logprobs, text_offset=text_offset)
                    text_offset += len(delta.text)
                    await self.outbox.put(entry, event)
                    if generated is not None:
                        generated.append(delta.text)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        if generated is not None:
            log.info("request %s output: %s", job.request_id, content("".join(generated)), extra=about(job.request_id))
        return self._end(finish_reason, prompt_tokens, completion_tokens)

    @staticmethod
    def _end(finish_reason: str, prompt_tokens: int, completion_tokens: int) -> tuple[wire.Event, FinalState]:
        return (
            wire.Event(
                "end", finish_reason=finish_reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
            ),
            FinalState("done", finish_reason, prompt_tokens, completion_tokens),
        )

    async def _heartbeat(self) -> None:
        """Every beat: refresh the registry entry, renew the leases of running requests (dropping those
        another worker took), pick up cancellations of requests that emit nothing yet, and take over
        requests whose workers stopped renewing theirs."""
        while not self._closing:
            await asyncio.sleep(self.settings.worker_heartbeat_s)
            reason = self.engine.dead()
            if reason is not None and self.engine_failure is None:
                log.error("%s", reason)
                self.engine_failure = EngineDeadError(reason)
                self._slot_freed.set()  # wake the pull loop, which then stops the worker
            try:
                await registry.publish(self._client, self.info())
                self.metrics.running.set(len(self._running))
                self.metrics.waiting.set(await self.store.queue_waiting(self.engine.model_name))
                command = await registry.take_command(self._client, self.worker_id)
                if command:
                    await self._obey(command)
                await self._renew_leases()
                flags = await self.store.cancel_flags(list(self._running))
                for request_id, flagged in flags.items():
                    running = self._running.get(request_id)
                    if flagged and running is not None and running.log is not None:
                        running.log.request_cancel()
                await self._cancel_unattended()
                self._enforce_deadlines()
                if (
                    self._state == "active"
                    and self.engine_failure is None
                    and time.monotonic() >= self._no_takeover_until
                ):
                    await self._take_over_abandoned()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                reraise_if_cancelling()
                log.warning("heartbeat failed: %s", exc)
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group()

    async def _cancel_unattended(self) -> None:
        """Cancel requests whose clients all left more than the grace period ago (zombie generation),
        unless they were created to run in the background."""
        candidates = [
            rid for rid, r in self._running.items() if r.log is not None and not r.background and not r.log.lost
        ]
        for request_id in await self.store.unattended(candidates, now_ms()):
            running = self._running.get(request_id)
            if running is not None and running.log is not None:
                log.info(
                    "request %s: no client attached for %.0fs; cancelling it",
                    request_id,
                    self.settings.disconnect_grace_s,
                )
                running.log.request_cancel(
                    f"cancelled: no client was attached for {self.settings.disconnect_grace_s:g}s"
                )

    def _enforce_deadlines(self) -> None:
        deadline_ms = self.settings.request_deadline_s * 1000
        now = now_ms()
        for request_id, running in self._running.items():
            if running.log is not None and now - running.enqueued_ms > deadline_ms:
                log.info("request %s passed its deadline", request_id, extra=about(request_id))
                running.log.request_cancel(
                    f"deadline exceeded: still running {self.settings.request_deadline_s:g}s after it was submitted",
                    error_type="deadline_exceeded",
                    state="failed",
                )

    async def _renew_leases(self) -> None:
        held = {r.entry_id: rid for rid, r in self._running.items() if r.log is not None and not r.log.lost}
        renewed = await self.store.renew_leases(self.engine.model_name, self.worker_id, list(held))
        for entry_id in set(held) - renewed:
            running = self._running.get(held[entry_id])
            if running is not None and running.log is not None and not running.log.done.is_set():
                running.log.mark_lost("lease lost to another worker")

    async def _take_over_abandoned(self) -> None:
        free = self.engine.capacity - len(self._running)
        if free <= 0:
            return
        claimed = await self.store.claim_abandoned(
            self.engine.model_name, self.worker_id, int(self.settings.lease_timeout_s * 1000), free
        )
        for entry_id, fields, delivered in claimed:
            if any(r.entry_id == entry_id for r in self._running.values()):
                continue  # ours all along (its lease only looked expired, e.g. after a Redis outage)
            if delivered > self.settings.max_attempts:
                self._background(self._dead_letter(entry_id, fields, delivered))
            else:
                self._start(entry_id, fields, takeover=True)

    async def _dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes] | None, delivered: int) -> None:
        """A request whose workers kept dying: end it with an error and record it for operators."""
        try:
            job = wire.decode(fields[b"d"], wire.Job) if fields else None
        except (KeyError, wire.WireError):
            job = None
        request_id = job.request_id if job else "?"
        reason = f"gave up after {delivered - 1} attempts: every worker that ran it stopped"
        if job is not None:
            await self.store.fail_abandoned(job.request_id, self.worker_id, f"request failed: {reason}")
        await self.store.dead_letter(self.engine.model_name, entry_id, request_id, reason)
        self.metrics.dead_letters.inc()
        log.error("request %s dead-lettered: %s", request_id, reason, extra=about(request_id))

    async def _release(self, request_ids: list[str]) -> int:
        """Hand running requests to other workers now (drain --migrate, rebalance): stop generating them
        and release their leases; another worker continues each from its emitted tokens."""
        entries = []
        for request_id in request_ids:
            running = self._running.get(request_id)
            if running is None or running.log is None or running.log.done.is_set() or running.log.lost:
                continue
            running.log.mark_lost("migrated to another worker")
            entries.append(running.entry_id)
        idle_ms = int(self.settings.lease_timeout_s * 1000) * 10
        await self.store.release_entries(self.engine.model_name, self.worker_id, entries, idle_ms)
        self._no_takeover_until = time.monotonic() + 3 * self.settings.lease_timeout_s
        self.metrics.migrations.inc(len(entries))
        log.info("released %d running request(s) to other workers", len(entries))
        return len(entries)

    async def _obey(self, command: str) -> None:
        """An operator command: ``drain`` (finish, then exit), ``migrate`` (hand everything over, then exit)
        or ``shed N`` (hand N running requests to idle workers and go on)."""
        verb, _, argument = command.partition(" ")
        log.warning("operator command: %s", command)
        if verb in ("drain", "migrate") and self._stop is not None:
            self._migrate_on_drain = verb == "migrate"
            self._state = "draining"
            self._stop.set()
        elif verb == "shed" and argument.isdigit():
            await self._release(list(self._running)[: int(argument)])
        else:
            log.error("unknown operator command %r", command)

    async def _drain(self) -> None:
        if self._migrate_on_drain:
            await self._release(list(self._running))
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if not tasks:
            return
        log.info("draining: waiting up to %.1fs for %d running requests", self.settings.drain_timeout_s, len(tasks))
        _done, pending = await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("drain timeout: %d requests left unfinished in the queue's pending list", len(pending))
            await asyncio.wait(pending)
