"""Reading a request's events for a stream session: replay from Redis in bounded batches, then follow live.

The resume position is checked at both ends: the event a client names must be one this request had
(else 400), the first event replayed must be exactly the next one (else the events expired: 410), and
every batch from the live reader must continue the last one without a gap (else the connection goes back
to range reads from its own cursor, which either fills the gap or reports that events expired).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenspool.gateway.errors import APIError, bad_request, not_found
from tokenspool.gateway.metrics import GatewayMetrics
from tokenspool.gateway.relay import Relay
from tokenspool.gateway.settings import GatewaySettings
from tokenspool.shared import keys, wire
from tokenspool.shared.logs import about
from tokenspool.shared.store import TERMINAL_STATES, RequestMeta, RequestStore

Batch = list[tuple[int, bytes]]

log = logging.getLogger("tokenspool.gateway.reader")


class EventsExpiredError(Exception):
    """Events a client still needs are no longer in Redis (retention ran out or the stream was trimmed)."""


def parse_resume_id(last_event_id: str) -> tuple[str, int]:
    """The (request id, sequence) a client's Last-Event-ID names; a 400 when it is not one of ours."""
    try:
        return keys.parse_event_id(last_event_id)
    except ValueError:
        raise bad_request(
            f"malformed event id {last_event_id!r}", param="last_event_id", code="invalid_event_id"
        ) from None


@dataclass(frozen=True, slots=True)
class ResumePoint:
    meta: RequestMeta
    after_seq: int
    first_batch: Batch
    submitted_here: bool = False
    """The request was created by this very connection (nobody can have been attached to it before)."""

    @property
    def at_end(self) -> bool:
        """The client named the request's last event, and the request has ended: nothing can follow."""
        return self.after_seq > 0 and self.meta.terminal and self.after_seq >= self.meta.last_seq


class IdleTimer:
    """Sets ``wake`` (and :attr:`expired`) once ``tick_s`` pass without a :meth:`restart`: one timer per live
    stream, re-armed at most once per ``tick_s``, where a timeout around every wait for the next event
    (``asyncio.timeout``) armed and cancelled a timer per event, a sixth of a gateway's CPU per event at 100
    streams. A restart only notes the time; the timer, when it fires early, re-arms for what is left."""

    __slots__ = ("_handle", "_loop", "_since", "_tick_s", "_wake", "expired")

    def __init__(self, tick_s: float, wake: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._tick_s = tick_s
        self._wake = wake
        self.expired = False
        self._since = self._loop.time()
        self._handle = self._loop.call_at(self._since + tick_s, self._fire)

    def restart(self) -> None:
        """Something happened: the next expiry is ``tick_s`` from now."""
        self._since = self._loop.time()
        if self.expired:
            self.expired = False
            self._handle = self._loop.call_at(self._since + self._tick_s, self._fire)

    def _fire(self) -> None:
        due = self._since + self._tick_s
        if self._loop.time() < due - 0.001:  # a restart moved it; within a millisecond counts as due (uvloop's
            # clock and timers have millisecond resolution)
            self._handle = self._loop.call_at(due, self._fire)
            return
        self.expired = True
        self._wake.set()

    def stop(self) -> None:
        self._handle.cancel()


class EventReader:
    """Opens and follows request event streams for this gateway process."""

    def __init__(self, store: RequestStore, relay: Relay, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self.store = store
        self.relay = relay
        self.settings = settings

    async def open(self, request_id: str, last_event_id: str | None, owner: str) -> ResumePoint:
        """Check that ``owner`` may read the stream from the given position; raise the right API error if not.

        A request of another owner is answered exactly as an unknown one, before any check that could tell
        them apart (its length, its retention)."""
        if not keys.is_request_id(request_id):
            raise not_found(f"no request {request_id!r}", code="request_not_found")
        after_seq = 0
        if last_event_id:
            named_request, after_seq = parse_resume_id(last_event_id)
            if named_request != request_id:
                raise bad_request(
                    f"event id {last_event_id!r} belongs to another request",
                    param="last_event_id",
                    code="invalid_event_id",
                )
        meta = await self.store.meta(request_id)
        if meta is None or meta.owner != owner:
            raise not_found(
                f"no request {request_id!r} (unknown, or expired past its tombstone)", code="request_not_found"
            )
        if after_seq > meta.last_seq:
            raise bad_request(
                f"request {request_id} never had event {last_event_id!r} (it has {meta.last_seq})",
                param="last_event_id",
                code="invalid_event_id",
            )
        first_batch: Batch = []
        if meta.last_seq > after_seq:
            first_batch = await self.store.read_events(request_id, after_seq, self.settings.replay_batch_events)
            if not first_batch or first_batch[0][0] != after_seq + 1:
                raise APIError(
                    410,
                    f"the events of request {request_id} after position {after_seq} have expired "
                    f"(retention is {self.settings.retention_s:g}s)",
                    error_type="gone",
                    code="events_expired",
                )
        return ResumePoint(meta, after_seq, first_batch)

    async def open_submitted(self, request_id: str, meta: RequestMeta | None, owner: str) -> ResumePoint:
        """The start of a request just submitted: from the metadata it was created with when it was created
        now (no read back, nothing to replay), else (an Idempotency-Key named an earlier one) from Redis."""
        if meta is None:
            return await self.open(request_id, None, owner)
        return ResumePoint(meta, 0, [], submitted_here=True)

    async def batches(self, point: ResumePoint, tick_s: float) -> AsyncIterator[Batch]:
        """Contiguous batches of (seq, payload) until the terminal event; an empty batch every idle ``tick_s``.

        Raises :class:`EventsExpiredError` when events between the cursor and the live tail are gone.
        """
        request_id = point.meta.request_id
        cursor = point.after_seq
        pending = point.first_batch
        if point.meta.terminal and cursor >= point.meta.last_seq:
            return  # resumed after the final event (the usage chunk's id): there is nothing left to send
        # Nothing stored after the cursor when the request was read: the live reader's XREAD from the cursor
        # returns whatever has been written since, so a range read first would only cost a round trip.
        replay = bool(pending) or point.meta.last_seq > cursor
        while True:
            # Replay: range reads of bounded size until caught up.
            while replay:
                if pending:
                    if pending[0][0] != cursor + 1:
                        raise EventsExpiredError(f"events after {cursor} are gone")
                    cursor = pending[-1][0]
                    self.metrics.replayed_events.inc(len(pending))
                    yield pending
                    if wire.is_terminal(pending[-1][1]):
                        return
                    short = len(pending) < self.settings.replay_batch_events
                    pending = []
                    if short:
                        break
                pending = await self.store.read_events(request_id, cursor, self.settings.replay_batch_events)
                if not pending:
                    break
            # Live: the multiplexed reader fills this subscription from the cursor on.
            sub = self.relay.subscribe(request_id, cursor)
            idle = IdleTimer(tick_s, sub.wake)
            last_check = time.monotonic()
            try:
                while True:
                    if not sub.items and not sub.overflowed:
                        if not idle.expired:
                            await sub.wake.wait()
                        if idle.expired and not sub.items and not sub.overflowed:
                            sub.wake.clear()  # set by the timer alone: nothing is buffered
                            idle.restart()
                            if time.monotonic() - last_check >= self.settings.heartbeat_s:
                                last_check = time.monotonic()
                                if await self._ended_before(request_id, cursor):
                                    return
                            yield []
                            continue
                    if sub.overflowed:
                        log.debug(
                            "%s: client fell behind its buffer; catching up from Redis",
                            request_id,
                            extra=about(request_id),
                        )
                        break
                    items = sub.take()
                    if not items:
                        continue
                    if items[0][0] != cursor + 1:
                        break  # a gap: go back to range reads from our own cursor
                    cursor = items[-1][0]
                    idle.restart()
                    yield items
                    if wire.is_terminal(items[-1][1]):
                        return
            finally:
                idle.stop()
                self.relay.unsubscribe(sub)
            replay = True
            pending = await self.store.read_events(request_id, cursor, self.settings.replay_batch_events)

    async def _ended_before(self, request_id: str, cursor: int) -> bool:
        """An idle stream checks now and then that its request still exists: if Redis lost it (a restart
        without persistence), the client is told so instead of waiting for events that cannot come.
        True when the request has ended and the client already has its last event."""
        state, last_seq = await self.store.state(request_id)
        if not state:
            raise EventsExpiredError("the request is gone from Redis (it expired, or Redis lost its data)")
        if last_seq > cursor:
            self.relay.nudge(request_id)
            return False
        return state in TERMINAL_STATES
