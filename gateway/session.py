"""The stream session: one request streamed to one client, whatever the transport.

A session owns everything a stream does besides encoding: its place among its key's open streams (the
lease), its attachment to the request (announced unless this very connection created the request), the
queue notices while the request waits (and the queue timeout, which whoever sees first enforces: a worker
that pulls the request or a gateway that streams it), the inter-token timeout, the mapping of failures
(events expired, Redis unreachable) to an interruption the client can resume from, and every stream metric.

It yields typed items; SSE, WebSocket and gRPC only encode and write them (as centrifuge's client session
does for its transports), so a new transport or a new kind of item is written once, here or in one encoder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from tokenspool.gateway.attachments import Attachments
from tokenspool.gateway.auth import Principal
from tokenspool.gateway.catalog import ModelCatalog
from tokenspool.gateway.errors import REDIS_UNREACHABLE, bad_request
from tokenspool.gateway.limits import KeyLimits, StreamLease
from tokenspool.gateway.metrics import GatewayMetrics
from tokenspool.gateway.reader import EventReader, EventsExpiredError, ResumePoint, parse_resume_id
from tokenspool.gateway.schemas import ChatCompletionRequest, CompletionRequest
from tokenspool.gateway.settings import GatewaySettings
from tokenspool.gateway.submission import SubmissionService
from tokenspool.shared import wire
from tokenspool.shared.aio import reraise_if_cancelling
from tokenspool.shared.logs import about
from tokenspool.shared.store import RequestStore, StreamFormat

log = logging.getLogger("tokenspool.gateway.session")


# -- what a session yields ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Events:
    """Stored events, contiguous and in order: one, or several when the client is behind."""

    events: list[tuple[int, wire.Event]]
    """(sequence number, event) pairs."""
    final_state: str = ""
    """The request's state when the last of these events ends it (``done``, ``cancelled``, ``failed``), else
    empty: a failed request's state tells a cancel from a failure, which its error event alone does not."""


@dataclass(frozen=True, slots=True)
class Queued:
    """Now and then while the request waits for a worker."""

    waiting: int
    """Requests of its model waiting, this one included."""
    model: str

    def notice(self) -> str:
        return f"queued: {self.waiting} request(s) waiting for model {self.model}"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing was sent for ``heartbeat_s``: a transport without pings of its own shows it is alive."""


@dataclass(frozen=True, slots=True)
class Interrupted:
    """The stream cannot go on (the request may: the client resumes from its last event); the last item."""

    code: str
    """``inter_token_timeout``, ``events_expired`` or ``redis_unavailable``."""
    message: str
    status: int
    """The HTTP status of the same condition before a stream starts: 410 for expired events, else 503."""


StreamItem = Events | Queued | Heartbeat | Interrupted
HEARTBEAT: Final = Heartbeat()


@dataclass(frozen=True, slots=True)
class Transport:
    """What a session says about the transport it streams over."""

    name: str
    """In the session's log lines: ``SSE``, ``WebSocket``, ``gRPC``."""
    resume_hint: str
    """How a client of this transport resumes, ending the messages of interruptions."""


# -- one session -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Attendance:
    """What a stream's end tells its attachment: whether the stream read its request's terminal event."""

    request_ended: bool = False


class StreamSession:
    """One stream of one request, from a resume point, holding its key's open-stream place until
    :meth:`close` (which the transport calls once the stream has ended however it ended: a generator that
    never started runs no cleanup of its own)."""

    def __init__(self, hub: StreamSessions, point: ResumePoint, lease: StreamLease, transport: Transport) -> None:
        self._hub = hub
        self.point = point
        self._lease = lease
        self._transport = transport

    @property
    def request_id(self) -> str:
        return self.point.meta.request_id

    def close(self) -> None:
        """Give the stream's place back (idempotent)."""
        self._hub.limits.close_stream(self._lease)

    @contextmanager
    def _attached(self) -> Iterator[Attendance]:
        """Attached to the request while it runs; announced at once unless this connection created it. The
        caller records on what it is given when it has read the request's terminal event."""
        meta = self.point.meta
        connection_id = None
        if not meta.terminal:
            connection_id = self._hub.attachments.attach(meta.request_id, announce=not self.point.submitted_here)
        attendance = Attendance()
        try:
            yield attendance
        finally:
            if connection_id is not None:
                self._hub.attachments.detach(connection_id, request_ended=attendance.request_ended)

    async def items(self) -> AsyncGenerator[StreamItem, None]:
        """The stream from the resume point to the request's terminal event, or to an :class:`Interrupted`.

        Consume it in ``contextlib.aclosing`` (or ``aclose`` it): its attachment ends and its metrics are
        counted when it closes."""
        hub = self._hub
        settings, metrics = hub.settings, hub.metrics
        point = self.point
        meta = point.meta
        request_id = meta.request_id
        hint = self._transport.resume_hint
        opened = time.monotonic()
        first_delta_at = last_delta_at = 0.0
        deltas = handovers = 0
        ended = "disconnected"
        metrics.streams_active.inc()
        if point.after_seq:
            metrics.resumes.inc()
            metrics.resume_backlog.observe(max(0, meta.last_seq - point.after_seq))
        tick_s = min(settings.heartbeat_s, settings.queue_status_interval_s)
        last_write = last_event = opened
        seen_event = point.after_seq > 0
        try:
            with self._attached() as attendance:
                async for batch in hub.reader.batches(point, tick_s):
                    now = time.monotonic()
                    if batch:
                        seen_event = True
                        last_write = last_event = now
                        events = [(seq, wire.decode(payload, wire.Event)) for seq, payload in batch]
                        attendance.request_ended = events[-1][1].terminal
                        before = deltas
                        for _seq, event in events:
                            if event.kind == "delta":
                                deltas += 1
                            elif event.kind == "handover":
                                handovers += 1
                        if deltas > before:
                            if not first_delta_at:
                                first_delta_at = now
                                if point.after_seq:
                                    metrics.ttft_after_resume.observe(now - opened)
                                else:
                                    metrics.ttft.observe(max(0.0, time.time() - meta.enqueued_ms / 1000))
                            last_delta_at = now
                        metrics.events_sent.inc(len(batch))
                        yield Events(events, await self._final_state(events[-1][1]))
                        continue
                    if not seen_event:
                        waiting = await self._still_queued()
                        if waiting is not None:
                            last_write = now
                            yield Queued(waiting, meta.model)
                            continue
                    elif now - last_event >= settings.inter_token_timeout_s:
                        ended = "error"
                        message = f"no event for {settings.inter_token_timeout_s:g}s; the request goes on: {hint}"
                        yield Interrupted("inter_token_timeout", message, 503)
                        return
                    if now - last_write >= settings.heartbeat_s:
                        last_write = now
                        yield HEARTBEAT
            ended = "done"
        except EventsExpiredError as exc:
            ended = "error"
            yield Interrupted("events_expired", f"cannot continue the stream: {exc}", 410)
        except REDIS_UNREACHABLE as exc:
            reraise_if_cancelling()
            ended = "error"
            log.warning("%s: Redis failed mid-stream: %s", request_id, exc, extra=about(request_id))
            yield Interrupted("redis_unavailable", f"the request store (Redis) is unavailable; {hint}", 503)
        finally:
            duration_s = time.monotonic() - opened
            metrics.streams_active.dec()
            metrics.streams_ended.labels(ended).inc()
            if handovers:
                metrics.handovers.inc(handovers)
            metrics.stream_duration.observe(duration_s)
            if deltas > 1:
                metrics.tpot.observe((last_delta_at - first_delta_at) / (deltas - 1))
            log.info(
                "%s: %s stream closed (%s) after %d tokens in %.2fs, opened after event %d",
                request_id,
                self._transport.name,
                ended,
                deltas,
                duration_s,
                point.after_seq,
                extra=about(request_id),
            )

    async def _final_state(self, last: wire.Event) -> str:
        """The request's state when ``last`` ends it, else empty (read from Redis only for a failed request)."""
        if not last.terminal:
            return ""
        if last.kind == "end":
            return "done"
        state, _ = await self._hub.store.state(self.request_id)
        return state or "failed"

    async def _still_queued(self) -> int | None:
        """While the request waits for a worker: how many requests of its model wait; ends it when it has
        waited past the queue timeout. None once it no longer waits."""
        hub = self._hub
        meta = self.point.meta
        state, _ = await hub.store.state(meta.request_id)
        if state != "queued":
            return None
        waited_s = time.time() - meta.enqueued_ms / 1000
        timeout_s = hub.settings.queue_timeout_s
        if waited_s > timeout_s:
            message = f"timed out after {waited_s:.1f}s in the queue (queue timeout {timeout_s:g}s)"
            if await hub.store.expire_queued(meta.request_id, message):
                log.info("%s: %s", meta.request_id, message, extra=about(meta.request_id))
        return await hub.store.queue_waiting(meta.model)

    async def collect(self) -> tuple[list[wire.Event], wire.Event]:
        """Wait for the request to end, for a client that asked for one answer: (its delta events, its
        terminal event). No queue notices, no inter-token timeout and no stream metrics: it is no stream."""
        deltas: list[wire.Event] = []
        with self._attached():
            async for batch in self._hub.reader.batches(self.point, tick_s=max(self._hub.settings.heartbeat_s, 1.0)):
                for _seq, payload in batch:
                    event = wire.decode(payload, wire.Event)
                    if event.kind == "delta":
                        deltas.append(event)
                    elif event.terminal:
                        return deltas, event
        raise EventsExpiredError("stream ended without a terminal event")


# -- opening sessions --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamSessions:
    """Opens the stream sessions of this gateway process: each takes its key's open-stream place first and
    gives it back if it cannot open."""

    reader: EventReader
    submissions: SubmissionService
    catalog: ModelCatalog
    limits: KeyLimits
    attachments: Attachments
    store: RequestStore
    settings: GatewaySettings
    metrics: GatewayMetrics

    async def default_model(self) -> str:
        """The model of a request that names none: the only one live workers serve (else a 400 naming them)."""
        live = sorted(name for name, entry in (await self.catalog.models()).items() if entry.live_workers)
        if len(live) != 1:
            raise bad_request(
                f"missing required parameter 'model' (served: {', '.join(live) or 'none'})",
                param="model",
                code="missing_parameter",
            )
        return live[0]

    async def submit(
        self,
        caller: Principal,
        body: ChatCompletionRequest | CompletionRequest,
        *,
        stream_format: StreamFormat,
        idempotency_key: str | None,
        transport: Transport,
    ) -> StreamSession:
        """Enqueue a request and open its stream from the start (from the metadata it was created with: no
        read back). A request refused by the checks that need nothing else holds nothing, not even a moment
        of its key's open-stream limit."""
        self.submissions.check(body)
        lease = await self.limits.open_stream(caller)
        try:
            submitted = await self.submissions.submit(
                body, stream_format=stream_format, caller=caller, idempotency_key=idempotency_key
            )
            point = await self.reader.open_submitted(submitted.request_id, submitted.meta, caller.owner)
        except BaseException:
            self.limits.close_stream(lease)
            raise
        return StreamSession(self, point, lease, transport)

    async def reconnect(
        self,
        caller: Principal,
        body: ChatCompletionRequest | CompletionRequest,
        *,
        idempotency_key: str | None,
        last_event_id: str,
        transport: Transport,
    ) -> StreamSession:
        """A submission that carries ``Last-Event-ID`` is a reconnect (@microsoft/fetch-event-source retries a
        POST with the same body and headers, adding it): the stream of the request that id names, after that
        event; nothing is submitted. An Idempotency-Key it carries must name that same request."""
        self.submissions.check(body)  # the same body as the submission: refused the same way if it was
        request_id, _ = parse_resume_id(last_event_id)
        if idempotency_key is not None:
            earlier = await self.submissions.earlier_request(body, caller, idempotency_key)
            if earlier is not None and earlier != request_id:
                raise bad_request(
                    f"Last-Event-ID {last_event_id!r} names another request than this Idempotency-Key ({earlier})",
                    param="Last-Event-ID",
                    code="invalid_event_id",
                )
        return await self.resume(caller, request_id, last_event_id, transport)

    async def resume(
        self, caller: Principal, request_id: str, last_event_id: str | None, transport: Transport
    ) -> StreamSession:
        """Open a stream of the caller's request after ``last_event_id`` (from the start when None), with the
        resume checks of :meth:`EventReader.open`."""
        lease = await self.limits.open_stream(caller)
        try:
            point = await self.reader.open(request_id, last_event_id, caller.owner)
        except BaseException:
            self.limits.close_stream(lease)
            raise
        return StreamSession(self, point, lease, transport)
