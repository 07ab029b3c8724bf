"""Running one request: claim it, generate it, write its events through the outbox, end it, acknowledge it.

A request task never decides on its own to stop: a stop comes from outside (a client's cancel flag, a
policy, a lost lease) through its :class:`~tokenspool.worker.outbox.RequestLog`, which says how the request then ends.
The task interrupts the engine, writes that ending, and acknowledges the queue entry; a request that is
no longer this worker's (fenced, lease lost, ended meanwhile) is abandoned without a write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time

from tokenspool.shared import handover, wire
from tokenspool.shared.logs import about, content
from tokenspool.shared.queue import ModelQueue, QueueEntry
from tokenspool.shared.store import RequestStore, now_ms
from tokenspool.worker.engines.base import Engine, EngineDeadError, EngineError, EngineRequest
from tokenspool.worker.metrics import WorkerMetrics
from tokenspool.worker.outbox import Ending, Outbox, RequestLog, RequestLostError
from tokenspool.worker.running import RunningRequest, RunningRequests
from tokenspool.worker.settings import WorkerSettings
from tokenspool.worker.tasks import Chores

log = logging.getLogger("tokenspool.worker")


@dataclasses.dataclass(frozen=True, slots=True)
class RequestRunner:
    """Starts a task per request taken from the queue (new, or taken over from a worker that stopped)."""

    settings: WorkerSettings
    worker_id: str
    engine: Engine
    store: RequestStore
    queue: ModelQueue
    outbox: Outbox
    running: RunningRequests
    metrics: WorkerMetrics
    chores: Chores

    def start(self, entry: QueueEntry, *, takeover: bool = False) -> None:
        if entry.job is None:
            log.error("dropping undecodable queue entry %s: %s", entry.entry_id, entry.problem)
            self.chores.spawn(self.queue.finish(entry.entry_id), f"acknowledging entry {entry.entry_id!r}")
            return
        held = RunningRequest(entry_id=entry.entry_id, job=entry.job)
        held.task = asyncio.create_task(self._run(held, takeover), name=f"request {entry.job.request_id}")
        self.running.add(held)
        held.task.add_done_callback(functools.partial(self._ended, entry.job.request_id))

    def _ended(self, request_id: str, task: asyncio.Task[None]) -> None:
        self.running.remove(request_id, task)
        failure = None if task.cancelled() else task.exception()
        if failure is not None and not isinstance(failure, EngineDeadError):  # that one stops the worker
            # e.g. Redis unreachable while claiming: the entry stays pending, and is taken over when its
            # lease runs out.
            log.error("request %s: %s", request_id, failure, extra=about(request_id), exc_info=failure)

    async def _run(self, held: RunningRequest, takeover: bool) -> None:
        job = held.job
        request_id = job.request_id
        waited_s = (now_ms() - job.enqueued_ms) / 1000
        if not takeover and waited_s > self.settings.queue_timeout_s:
            message = f"timed out after {waited_s:.1f}s in the queue (queue timeout {self.settings.queue_timeout_s:g}s)"
            await self.store.expire_queued(request_id, message)
            await self.queue.finish(held.entry_id)
            log.info("request %s: %s", request_id, message, extra=about(request_id))
            return
        attempt, last_seq = await self.store.claim(request_id, self.worker_id, held.entry_id, takeover=takeover)
        if attempt == 0:
            log.info(
                "request %s can no longer be taken (cancelled, ended or expired); skipping it",
                request_id,
                extra=about(request_id),
            )
            await self.queue.finish(held.entry_id)
            return
        self.metrics.claims.inc()
        if takeover:
            self.metrics.takeovers.inc()
        else:
            self.metrics.queue_wait.observe(max(0.0, waited_s))
        emitted: list[wire.Event] = []
        if takeover:
            emitted = [e for e in await self.store.all_events(request_id) if e.kind == "delta"]
        entry = self.outbox.open(request_id, attempt, last_seq)
        held.log = entry
        if takeover:
            log.warning(
                "request %s taken over at event %d (attempt %d)", request_id, last_seq, attempt, extra=about(request_id)
            )
            await self.outbox.put(entry, handover.event(self.worker_id, last_seq, attempt))
        else:
            log.info("request %s started (attempt %d)", request_id, attempt, extra=about(request_id))
        if self.settings.log_content:
            prompt = job.prompt or "\n".join(f"{m.role}: {m.content}" for m in job.messages)
            log.info("request %s prompt: %s", request_id, content(prompt), extra=about(request_id))
        ending = await self._generate_until_stopped(job, entry, emitted)
        if ending is None:
            self._abandon(held, entry)
            return
        try:
            await self.outbox.finish(entry, ending)
        except RequestLostError:
            self._abandon(held, entry)
            return
        await self.queue.finish(held.entry_id)
        final = ending.final
        self.metrics.requests.labels(final.state).inc()
        log.info(
            "request %s %s (%s)", request_id, final.state, final.finish_reason or final.error, extra=about(request_id)
        )

    async def _generate_until_stopped(
        self, job: wire.Job, entry: RequestLog, emitted: list[wire.Event]
    ) -> Ending | None:
        """Generate until the engine finishes or a stop interrupts it; how the request ends, or None when it
        is no longer this worker's. The engine is interrupted (its stream closed) on a stop, and on this
        task's own cancellation, which is then re-raised."""
        generation = asyncio.create_task(self._generate(job, entry, emitted), name=f"generate {job.request_id}")
        try:
            await asyncio.wait((generation, entry.stopped), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            generation.cancel()
            raise
        if not generation.done():
            generation.cancel()
            await asyncio.wait((generation,))
        if entry.lost:
            return None
        if generation.cancelled():
            assert entry.stop is not None, "the generation is cancelled only by a stop"
            return entry.stop
        failure = generation.exception()
        if failure is None:
            return generation.result()
        if isinstance(failure, RequestLostError):
            return None
        if isinstance(failure, EngineError):
            return Ending.failed(failure.error_type, str(failure), param=failure.param)
        if isinstance(failure, EngineDeadError):
            log.error("engine died while running %s: %s", job.request_id, failure, extra=about(job.request_id))
            self.running.close(failure)  # the worker stops; the entry stays pending for another worker
        raise failure

    def _abandon(self, held: RunningRequest, entry: RequestLog) -> None:
        """Stop working on a request this worker no longer holds. Its queue entry is left alone: another
        worker owns it now (fenced, lease lost), or whoever ended it acknowledges it."""
        request_id = held.job.request_id
        log.warning("request %s abandoned by this worker: %s", request_id, entry.lost, extra=about(request_id))
        self.metrics.requests.labels("abandoned").inc()
        if entry.lost == "gone":
            self.chores.spawn(self.queue.finish(held.entry_id), f"acknowledging request {request_id}")

    async def _generate(self, job: wire.Job, entry: RequestLog, emitted: list[wire.Event]) -> Ending:
        emitted_ids = tuple(token for event in emitted for token in event.token_ids)
        request = EngineRequest(
            body=job.body,
            emitted=tuple((event.index, event.token_ids) for event in emitted if event.token_ids),
            request_id=job.request_id,
            kind=job.kind,
            prompt=job.prompt,
            messages=job.messages,
            sampling=job.sampling,
            emitted_token_ids=emitted_ids,
        )
        prompt_tokens = 0
        completion_tokens = len(emitted_ids)
        # Per choice, the tokens generated so far: stored on each delta of a request that asked for usage on
        # every chunk (vLLM counts them per choice), so any gateway renders a chunk's usage from the event.
        choice_tokens: dict[int, int] | None = None
        if job.continuous_usage:
            choice_tokens = {}
            for event in emitted:
                choice_tokens[event.index] = choice_tokens.get(event.index, 0) + len(event.token_ids)
        # Per choice, the characters its logprob tokens spelled so far: a completion's ``text_offset``, counted
        # as vLLM counts it (by the tokens reported, which an echoed prompt's start).
        text_offsets: dict[int, int] = {}
        for event in emitted:
            text_offsets[event.index] = text_offsets.get(event.index, 0) + _spelled(event.logprobs)
        finish_reason = "stop"
        reasoning_by_choice: dict[int, int] = {}  # each choice's reasoning tokens so far (a reasoning parser's)
        wants_logprobs = job.sampling.logprobs is not None
        # Choices a previous holder finished before it died (their last token came with the finish): the
        # engine, run again, still reports the prompt's length, and no second finish is streamed.
        finished_before = {event.index for event in emitted if event.finish_reason}
        generated: list[str] | None = [] if self.settings.log_content else None
        stream = self.engine.generate(request)
        step_started = time.monotonic()
        try:
            async for delta in stream:
                now = time.monotonic()
                self.metrics.engine_step.observe(now - step_started)
                step_started = now
                prompt_tokens = delta.request_prompt_tokens or delta.prompt_tokens
                completion_tokens += len(delta.token_ids)
                self.metrics.output_tokens.inc(len(delta.token_ids))
                if delta.finish_reason:
                    finish_reason = delta.finish_reason
                if delta.reasoning_tokens is not None:
                    reasoning_by_choice[delta.index] = delta.reasoning_tokens
                if delta.text or delta.token_ids or (delta.finish_reason and delta.index not in finished_before):
                    event = wire.Event(
                        "delta",
                        delta.text,
                        delta.token_ids,
                        delta.finish_reason,
                        index=delta.index,
                        reasoning=delta.reasoning,
                        tool_calls=delta.tool_calls,
                        answer=delta.answer,
                        prompt_token_ids=delta.prompt_token_ids,
                    )
                    if wants_logprobs:
                        offset = text_offsets.get(delta.index, 0)
                        event = dataclasses.replace(event, logprobs=delta.logprobs, text_offset=offset)
                        text_offsets[delta.index] = offset + _spelled(delta.logprobs)
                    if choice_tokens is not None:
                        so_far = choice_tokens[delta.index] = choice_tokens.get(delta.index, 0) + len(delta.token_ids)
                        event = dataclasses.replace(
                            event,
                            prompt_tokens=delta.prompt_tokens,
                            completion_tokens=so_far,
                            reasoning_tokens=delta.reasoning_tokens,
                        )
                    # A choice's last delta is followed at once by the request's end (or another choice's
                    # delta): both go in one round trip.
                    await self.outbox.put(entry, event, flush=not delta.finish_reason)
                    if generated is not None:
                        generated.append(delta.text)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        if generated is not None:
            log.info("request %s output: %s", job.request_id, content("".join(generated)), extra=about(job.request_id))
        reasoning_tokens = sum(reasoning_by_choice.values()) if reasoning_by_choice else None
        return Ending.finished(finish_reason, prompt_tokens, completion_tokens, reasoning_tokens)


def _spelled(logprobs: tuple[wire.TokenLogprob, ...]) -> int:
    """The characters these logprob tokens spell."""
    return sum(len(lp.token) for lp in logprobs)
