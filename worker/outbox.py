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
from tokenspool.shared.keys import RequestKeys
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
    def finished(
        cls, finish_reason: str, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None
    ) -> Ending:
        """The generation ran to its end."""
        return cls(
            wire.Event(
                "end",
                finish_reason=finish_reason,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                reasoning_tokens=reasoning_tokens,
            ),
            FinalState("done", finish_reason, prompt_tokens, completion_tokens),
        )

    @classmethod
    def failed(cls, error_type: str, message: str, state: RequestState = "failed", *, param: str = "") -> Ending:
        """The request ends with an error event (``state`` "cancelled" for a cancellation; ``param``: the
        request parameter a refusal names)."""
        return cls(
            wire.Event("error", error_type=error_type, message=message, param=param), FinalState(state, error=message)
        )

    @classmethod
    def cancelled(cls, message: str = "cancelled by the client") -> Ending:
        return cls.failed("cancelled", message, "cancelled")


@dataclass(eq=False)
class RequestLog:
    """The write side of one running request.

    ``stopped`` resolves when the generation must stop: a stop was requested (``stop`` says how the
    request then ends) or the request was lost (``lost`` says why; nothing more is written)."""

    keys: RequestKeys
    """The request's id and key names, built once (every round trip's append names them)."""
    attempt: int
    next_seq: int
    unflushed: list[bytes] = field(default_factory=list)
    """Events put and not yet written: not on the primary, or (waiting for replicas) not yet confirmed."""
    on_primary: int = 0
    """How many of ``unflushed`` the primary holds unconfirmed by its replicas (redis_min_replicas_acked)."""
    final: FinalState | None = None
    lost: str = ""
    stop: Ending | None = None
    stopped: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    done: asyncio.Event = field(default_factory=asyncio.Event)
    space: asyncio.Event = field(default_factory=asyncio.Event)
    ttl_renewed_at: float = float("-inf")
    """When an append last renewed the running TTL of the request's keys (monotonic seconds)."""

    @property
    def request_id(self) -> str:
        return self.keys.request_id

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
        self.on_primary = 0
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
        observe_lost: Callable[[int], None] | None = None,
    ) -> None:
        """``observe_flush(seconds)``: each round trip's duration; ``observe_lost(count)``: events Redis had
        acknowledged and then lost (found when the next append of their request meets a shorter stream)."""
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
        self._observe_lost = observe_lost
        self._reloaded_scripts = False

    def open(self, request_id: str, attempt: int, last_seq: int) -> RequestLog:
        return RequestLog(keys=RequestKeys.of(request_id), attempt=attempt, next_seq=last_seq + 1)

    async def put(self, entry: RequestLog, event: wire.Event, *, flush: bool = True) -> None:
        """Queue ``event`` as the request's next (waiting while the request has too much unwritten).

        ``flush=False``: something follows at once (a choice's last delta: the request's end, or another
        choice's delta of the same engine step), so the flusher is not woken for this event alone; it goes
        in the round trip of the next event put by anyone. A one-token reply was two round trips, its token
        and its end, each waking every gateway that relays it."""
        await self._put(entry, event, None, flush=flush)

    async def finish(self, entry: RequestLog, ending: Ending) -> None:
        """Queue the request's last event and wait until everything it put is written; RequestLostError
        when it cannot be (the request is no longer this worker's)."""
        await self._put(entry, ending.event, ending.final)
        await entry.done.wait()
        if entry.lost:
            raise RequestLostError(f"{entry.request_id}: {entry.lost}")

    async def _put(self, entry: RequestLog, event: wire.Event, final: FinalState | None, *, flush: bool = True) -> None:
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
        if flush:
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
            # Of the unwritten events, the first ``on_primary`` are on the primary already (their replicas
            # did not confirm them yet): only the rest are sent, and this round trip's WAIT covers them all.
            payloads = entry.unflushed[entry.on_primary :]
            first_seq = entry.next_seq - len(payloads)
            refresh = now - entry.ttl_renewed_at >= self._ttl_renew_s
            appends.append(Append(entry.keys, entry.attempt, first_seq, payloads, entry.final, refresh))
        started = time.perf_counter()
        results, shortfall = await self._store.append_batch(appends, self._maxlen)
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
            if reload and isinstance(result, redis.exceptions.NoScriptError):
                self._dirty[entry] = None
                self._wake.set()
                continue
            if isinstance(result, Exception):
                failed.append(f"{entry.request_id}: {result}")
                self._dirty[entry] = None
                self._wake.set()
                continue
            self._settle(entry, append, result, now, confirmed=shortfall is None)
        if shortfall is not None:
            # Resent after the flusher's backoff: the replicas are behind or gone, and asking again at once
            # would only add WAITs.
            raise shortfall
        if failed:
            # Retried with the flusher's backoff rather than at once (a script error is not transient
            # the way a dropped connection is, and must not become a hot loop).
            raise redis.exceptions.ResponseError(f"{len(failed)} append(s) failed, first: {failed[0]}")

    def _settle(
        self, entry: RequestLog, append: Append, result: tuple[int, int], now: float, *, confirmed: bool
    ) -> None:
        """Apply one append's answer. ``confirmed``: the round trip's WAIT counted enough replicas (or none
        are required), so what the primary holds counts as written; else it is only on the primary."""
        code, value = result
        confirmed_seq = entry.next_seq - len(entry.unflushed) - 1  # the last event that counts as written
        sent_seq = append.first_seq - 1 + len(append.payloads)  # the last event this round trip carried
        terminal = append.final is not None
        if code >= 0 or (code == APPEND_ENDED and terminal and value == sent_seq):
            # Written (an ended request: this very batch ended it in an earlier round trip whose answer was
            # lost or unconfirmed; the request's one writer is this attempt, so that end is ours).
            if code >= 0 and append.refresh_ttl:
                entry.ttl_renewed_at = now
            if code >= 0 and value == 1:
                entry.request_stop(Ending.cancelled())
            held = sent_seq - confirmed_seq
        elif code == APPEND_OUT_OF_SEQUENCE and confirmed_seq <= value <= sent_seq:
            # The primary holds up to ``value``: an earlier round trip wrote part of this before its reply was
            # lost, or the replicas had not confirmed it and a failover lost it (then it is resent).
            held = value - confirmed_seq
        else:
            if code == APPEND_OUT_OF_SEQUENCE and value < confirmed_seq:
                self._report_lost(entry.request_id, confirmed_seq - value, value)
            reason = _LOST_REASONS.get(code, f"out of sequence at {value}")
            log.warning(
                "request %s can no longer be written by this worker: %s",
                entry.request_id,
                reason,
                extra=about(entry.request_id),
            )
            entry.mark_lost(reason)
            return
        if not confirmed:
            entry.on_primary = held
            self._dirty[entry] = None
            return
        del entry.unflushed[:held]
        entry.on_primary = 0
        entry.space.set()
        if entry.unflushed:
            self._dirty[entry] = None
            self._wake.set()
        elif terminal:
            entry.done.set()

    def _report_lost(self, request_id: str, count: int, held: int) -> None:
        """Redis holds fewer events of this request than it acknowledged to this worker: say so loudly (the
        request then goes to a takeover, which continues from what Redis holds)."""
        log.error(
            "Redis lost %d acknowledged event(s) of request %s (it holds up to event %d): a failover to a "
            "replica that had not received them, or a restart without persistence; "
            "TOKENSPOOL_REDIS_MIN_REPLICAS_ACKED prevents the first",
            count,
            request_id,
            held,
            extra=about(request_id),
        )
        if self._observe_lost is not None:
            self._observe_lost(count)
