"""Group commit of events to Redis: every delta of every running request, one round trip per engine step.

Request tasks :meth:`Outbox.put` events and go on, and end with :meth:`Outbox.finish` (the last event, then
wait until all is written); one flusher task takes everything that arrived since its last round trip and
sends it as one pipeline of atomic append scripts. Sequence numbers are fixed
when an event is put, and the script writes them as explicit stream ids, so a retried append after a
broken connection is exactly-once: the script answers "out of sequence" with what it already has, and
the outbox drops what was written and resends the rest. Each request's unflushed events are bounded;
a request whose Redis writes fall behind waits in :meth:`put` (backpressure on the engine consumer).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.exceptions

from tokenspool.shared import wire
from tokenspool.shared.aio import reraise_if_cancelling
from tokenspool.shared.logs import about
from tokenspool.shared.store import (
    APPEND_ENDED,
    APPEND_FENCED,
    APPEND_GONE,
    APPEND_OUT_OF_SEQUENCE,
    Append,
    FinalState,
    RequestState,
    RequestStore,
)

log = logging.getLogger("tokenspool.worker.outbox")

_LOST_REASONS = {APPEND_GONE: "gone", APPEND_FENCED: "fenced", APPEND_ENDED: "ended"}


class RequestLostError(Exception):
    """The request can no longer be written by this worker (fenced by another attempt, ended, or expired)."""


@dataclass(frozen=True, slots=True)
class Ending:
    """How a request ends: its last event and the state that event leaves in its metadata."""

    event: wire.Event
    final: FinalState

    @classmethod
    def finished(cls, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> Ending:
        """The generation ran to its end."""
        return cls(
            wire.Event(
                "end", finish_reason=finish_reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
            ),
            FinalState("done", finish_reason, prompt_tokens, completion_tokens),
        )

    @classmethod
    def failed(cls, error_type: str, message: str, state: RequestState = "failed") -> Ending:
        """The request ends with an error event (``state`` "cancelled" for a cancellation)."""
        return cls(wire.Event("error", error_type=error_type, message=message), FinalState(state, error=message))

    @classmethod
    def cancelled(cls, message: str = "cancelled by the client") -> Ending:
        return cls.failed("cancelled", message, "cancelled")


@dataclass(eq=False)
class RequestLog:
    """The write side of one running request.

    ``stopped`` resolves when the generation must stop: a stop was requested (``stop`` says how the
    request then ends) or the request was lost (``lost`` says why; nothing more is written)."""

    request_id: str
    attempt: int
    next_seq: int
    unflushed: list[bytes] = field(default_factory=list)
    final: FinalState | None = None
    lost: str = ""
    stop: Ending | None = None
    stopped: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    done: asyncio.Event = field(default_factory=asyncio.Event)
    space: asyncio.Event = field(default_factory=asyncio.Event)
    ttl_renewed_at: float = float("-inf")
    """When an append last renewed the running TTL of the request's keys (monotonic seconds)."""

    def request_stop(self, ending: Ending) -> None:
        """Stop this request (a client asked, nobody stayed attached, its deadline passed) and end it with
        ``ending``; the first request wins."""
        if self.stop is None:
            self.stop = ending
            if not self.stopped.done():
                self.stopped.set_result(None)

    def mark_lost(self, reason: str) -> None:
        self.lost = reason
        self.unflushed.clear()
        self.done.set()
        self.space.set()
        if not self.stopped.done():
            self.stopped.set_result(None)


class Outbox:
    def __init__(
        self,
        store: RequestStore,
        *,
        stream_maxlen: int,
        max_unflushed: int,
        observe_flush: Callable[[float], None] | None = None,
    ) -> None:
        self._store = store
        # Renewing the keys' TTL on every append cost three commands per event; a quarter of the TTL
        # between renewals keeps a running request's keys alive just as surely.
        self._ttl_renew_s = store.running_ttl_ms / 1000 / 4
        self._maxlen = stream_maxlen
        self._max_unflushed = max_unflushed
        self._dirty: dict[RequestLog, None] = {}
        self._wake = asyncio.Event()
        self.round_trips = 0
        self._observe_flush = observe_flush
        self._reloaded_scripts = False

    def open(self, request_id: str, attempt: int, last_seq: int) -> RequestLog:
        return RequestLog(request_id=request_id, attempt=attempt, next_seq=last_seq + 1)

    async def put(self, entry: RequestLog, event: wire.Event) -> None:
        """Queue ``event`` as the request's next (waiting while the request has too much unwritten)."""
        await self._put(entry, event, None)

    async def finish(self, entry: RequestLog, ending: Ending) -> None:
        """Queue the request's last event and wait until everything it put is written; RequestLostError
        when it cannot be (the request is no longer this worker's)."""
        await self._put(entry, ending.event, ending.final)
        await entry.done.wait()
        if entry.lost:
            raise RequestLostError(f"{entry.request_id}: {entry.lost}")

    async def _put(self, entry: RequestLog, event: wire.Event, final: FinalState | None) -> None:
        while len(entry.unflushed) >= self._max_unflushed and not entry.lost:
            entry.space.clear()
            await entry.space.wait()
        if entry.lost:
            raise RequestLostError(f"{entry.request_id}: {entry.lost}")
        entry.unflushed.append(wire.encode(event))
        entry.next_seq += 1
        if final is not None:
            entry.final = final
        self._dirty[entry] = None
        self._wake.set()

    async def run(self) -> None:
        """The flusher: runs until cancelled."""
        backoff_s = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let the rest of this engine step's deltas arrive first
            batch = [entry for entry in self._dirty if entry.unflushed]
            self._dirty.clear()
            if not batch:
                continue
            try:
                await self._flush(batch)
                backoff_s = 0.05
            except (redis.exceptions.RedisError, OSError) as exc:
                reraise_if_cancelling()
                log.warning("redis write failed (%s); retrying %d requests in %.2fs", exc, len(batch), backoff_s)
                for entry in batch:
                    self._dirty[entry] = None
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
                self._wake.set()

    async def _flush(self, batch: list[RequestLog]) -> None:
        appends: list[Append] = []
        now = time.monotonic()
        for entry in batch:
            payloads = list(entry.unflushed)
            first_seq = entry.next_seq - len(payloads)
            refresh = now - entry.ttl_renewed_at >= self._ttl_renew_s
            appends.append(Append(entry.request_id, entry.attempt, first_seq, payloads, entry.final, refresh))
        started = time.perf_counter()
        results = await self._store.append_many(appends, self._maxlen)
        if self._observe_flush is not None:
            self._observe_flush(time.perf_counter() - started)
        self.round_trips += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "round trip %d: %d requests, %d events",
                self.round_trips,
                len(appends),
                sum(len(append.payloads) for append in appends),
            )
        # A node that does not know the append script (restarted, or the new owner of a resharded slot):
        # load the scripts and resend at once, unless that was already tried in the last round trip.
        reload = not self._reloaded_scripts and any(isinstance(r, redis.exceptions.NoScriptError) for r in results)
        if reload:
            log.info("Redis did not know the append script (a new or restarted node); loading it and resending")
            await self._store.load_scripts()
        self._reloaded_scripts = reload
        failed: list[str] = []
        for entry, append, result in zip(batch, appends, results, strict=True):
            count, first_seq, terminal = len(append.payloads), append.first_seq, append.final is not None
            if reload and isinstance(result, redis.exceptions.NoScriptError):
                self._dirty[entry] = None
                self._wake.set()
                continue
            if isinstance(result, Exception):
                failed.append(f"{entry.request_id}: {result}")
                self._dirty[entry] = None
                self._wake.set()
                continue
            code, value = result
            if code >= 0:
                if append.refresh_ttl:
                    entry.ttl_renewed_at = now
                del entry.unflushed[:count]
                entry.space.set()
                if value == 1:
                    entry.request_stop(Ending.cancelled())
                if terminal and not entry.unflushed:
                    entry.done.set()
            elif code == APPEND_OUT_OF_SEQUENCE and first_seq - 1 < value <= first_seq - 1 + count:
                # An earlier round trip wrote part or all of this batch before its reply was lost.
                del entry.unflushed[: value - (first_seq - 1)]
                entry.space.set()
                if entry.unflushed:
                    self._dirty[entry] = None
                    self._wake.set()
                elif terminal:
                    entry.done.set()
            else:
                reason = _LOST_REASONS.get(code, f"out of sequence at {value}")
                log.warning(
                    "request %s can no longer be written by this worker: %s",
                    entry.request_id,
                    reason,
                    extra=about(entry.request_id),
                )
                entry.mark_lost(reason)
        if failed:
            # Retried with the flusher's backoff rather than at once (a script error is not transient
            # the way a dropped connection is, and must not become a hot loop).
            raise redis.exceptions.ResponseError(f"{len(failed)} append(s) failed, first: {failed[0]}")
