"""WebSocket transport (``/v1/ws``): several resumable streams on one socket, in JSON text messages.

Client to server (one JSON object per text message, at most ``max_body_bytes``; ``"id"``, a string or
integer, is an optional tag the answers to that message echo back):

- ``{"prompt": "...", "id": ...}``: a chat request with one user message. ``{"messages": [...]}`` instead
  of ``prompt`` takes the OpenAI messages. Either may carry the OpenAI parameters of
  ``POST /v1/chat/completions`` (``model``, ``max_tokens``, ``temperature``, ``seed``, ``stop``, ``background``,
  ...), validated exactly as there; ``stream`` may only be true. Without ``model`` the request goes to the
  only model live workers serve (an error when there is not exactly one). ``"idempotency_key"`` does what
  the HTTP ``Idempotency-Key`` header does (a retry maps onto the request the key first created).
- ``{"cancel": "<request id>"}``: stop a request (any of the caller's, not only this socket's), as
  ``DELETE /v1/requests/{id}`` does.
- ``{"resume": "<request id>", "last_event_id": "<event id>" | null}``: stream a request's events after the
  given one (from the start when null), on any gateway; what ``GET /v1/requests/{id}/events`` does.

Authentication: when the gateway has API keys, the upgrade request carries ``Authorization: Bearer KEY``,
or, from a browser (which cannot set that header), offers the subprotocols ``tokenspool.v1`` and
``tokenspool.bearer.<the key in unpadded base64url>``; the gateway answers with ``tokenspool.v1`` alone (see
:mod:`gateway.auth`). Without a valid key the upgrade is refused with the HTTP API's 401 body. Every request
a socket submits belongs to its key; resuming or cancelling another key's request is ``request_not_found``.

Server to client:

- ``{"type": "accepted", "request_id", "id"}`` (a request was enqueued) and
  ``{"type": "resumed", "request_id", "id", "last_event_id"}``: a stream of that request starts.
- ``{"type": "token", "request_id", "event_id", "content"}`` per delta (with ``logprobs`` when asked for).
- ``{"type": "handover", "request_id", "event_id", "message"}`` where another worker continued the request.
- ``{"type": "queued", "request_id", "waiting"}`` now and then while the request waits for a worker.
- ``{"type": "done", "request_id", "id", "event_id", "state", "finish_reason", "usage"}``: the last message
  of every stream. ``state`` is the request's (``done``, ``cancelled``, ``failed``), or ``interrupted`` when
  this socket stopped relaying a request that may go on (resume it); ``event_id`` is the terminal event's,
  null when interrupted. A stream that fails or is cancelled sends ``{"type": "error", "request_id", "id",
  "error"}`` just before its ``done``.
- ``{"type": "cancel", "request_id", "id", "cancelled": true, "state": "cancelled" | "cancelling"}``.
- ``{"type": "error", "request_id", "id", "status", "error": {"message", "type", "param", "code"}}``: a
  message that was refused (invalid JSON, unknown field, ``n`` > 1, unknown model, unknown request, expired
  events, a request already streaming on this socket, more than ``MAX_STREAMS_PER_SOCKET`` streams, ...),
  with the OpenAI error and the HTTP status the same mistake gets over HTTP. It changes nothing, ends no
  stream (only ``done`` does), and the socket stays open.

Event ids are those of the SSE stream (``<request id>:<seq>``, contiguous over tokens, handovers and the
terminal event): a client that loses its socket resumes each of its requests, on a new socket to any
gateway, with the last event id it saw, and gets the rest with nothing lost and nothing repeated.

Each stream is one task reading through :meth:`EventReader.batches` and attached to its request like an
SSE connection; closing the socket stops the relays, not the requests (they get the disconnect grace
period, as after an SSE disconnect). Everything sent goes through one bounded queue per socket and one
writer with a timeout on every send: a client that stops reading is dropped, and meanwhile its relays
wait (their live buffers overflow into catch-up reads from Redis rather than growing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import redis.exceptions
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from gateway import ws_protocol as protocol
from gateway.auth import WS_PROTOCOL, Principal
from gateway.errors import APIError, bad_request
from gateway.limits import StreamLease
from gateway.routes import Services
from gateway.streaming import EventsExpiredError, ResumePoint
from shared import wire
from shared.aio import reraise_if_cancelling
from shared.logs import about

log = logging.getLogger("tokenspool.gateway.websocket")

MAX_STREAMS_PER_SOCKET: Final = 100
"""Streams one socket may relay at once; more is refused with a 429-style error (``too_many_streams``)."""

router = APIRouter()


@router.websocket("/v1/ws")
async def websocket_streams(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    offered: list[str] = list(websocket.scope.get("subprotocols", []))
    try:
        caller = services.keys.from_websocket(websocket.headers.get("authorization"), offered)
    except APIError as refused:
        services.events.metrics.errors.labels(str(refused.status), refused.code or refused.error_type).inc()
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            await websocket.send_denial_response(refused.response())
        else:
            await websocket.close(code=1008, reason=refused.message[:120])
        return
    await websocket.accept(subprotocol=WS_PROTOCOL if WS_PROTOCOL in offered else None)
    await WebSocketSession(websocket, services, caller).run()


class SocketGoneError(Exception):
    """The socket's writer has stopped (the client left, or did not take messages in time)."""


class WebSocketSession:
    """One client socket: a reader that handles commands in order, one relay task per stream, and one
    writer that sends whatever they queue."""

    def __init__(self, websocket: WebSocket, services: Services, caller: Principal) -> None:
        self._ws = websocket
        self._svc = services
        self._caller = caller
        self._outgoing: asyncio.Queue[str] = asyncio.Queue(maxsize=services.settings.client_buffer_events)
        self._relays: dict[str, asyncio.Task[None]] = {}
        self._writer_gone = asyncio.Event()

    async def run(self) -> None:
        reader = asyncio.create_task(self._read_loop(), name="ws-read")
        writer = asyncio.create_task(self._write_loop(), name="ws-write")
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            tasks = [reader, writer, *self._relays.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in (reader, writer):
            if (
                not task.cancelled()
                and task.exception() is not None
                and not isinstance(task.exception(), SocketGoneError)
            ):
                raise task.exception()  # type: ignore[misc]

    async def _send(self, message: dict[str, Any]) -> None:
        """Queue a message for the writer. Bounded in time as well as in size: once the writer has gone, or
        the queue stays full past the send timeout, the sender stops (a relay never waits forever)."""
        if self._writer_gone.is_set():
            raise SocketGoneError("the socket is closed")
        try:
            await asyncio.wait_for(self._outgoing.put(protocol.encode(message)), self._svc.settings.send_timeout_s)
        except TimeoutError:
            reraise_if_cancelling()
            raise SocketGoneError("the client did not take messages in time") from None

    async def _write_loop(self) -> None:
        try:
            await self._write_until_gone()
        finally:
            self._writer_gone.set()

    async def _write_until_gone(self) -> None:
        timeout_s = self._svc.settings.send_timeout_s
        while True:
            text = await self._outgoing.get()
            try:
                await asyncio.wait_for(self._ws.send_text(text), timeout_s)
            except TimeoutError:
                reraise_if_cancelling()
                log.info("WebSocket client did not accept a message within %.1fs; dropping it", timeout_s)
                return
            except (WebSocketDisconnect, WebSocketDisconnected):
                return

    async def _read_loop(self) -> None:
        while True:
            message = await self._ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("text")
            await self._handle(data if data is not None else message.get("bytes"))

    # -- commands ------------------------------------------------------------------------------------

    async def _handle(self, data: str | bytes | None) -> None:
        tag: protocol.Tag = None
        request_id: str | None = None
        try:
            raw = protocol.decode(data, self._svc.settings.max_body_bytes)
            request_id = protocol.named_request(raw)
            tag = protocol.tag_of(raw)
            command = protocol.parse(raw)
            if isinstance(command, protocol.Submit):
                await self._submit(command)
            elif isinstance(command, protocol.Cancel):
                await self._cancel(command)
            else:
                await self._start(command.request_id, command.last_event_id, command.tag, resumed=True)
        except APIError as error:
            self._svc.events.metrics.errors.labels(str(error.status), error.code or error.error_type).inc()
            await self._send(protocol.command_error(error, request_id=request_id, tag=tag))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            reraise_if_cancelling()
            log.warning("Redis unavailable: %s", exc)
            down = APIError(
                503,
                "the request store (Redis) is unavailable; retry later",
                error_type="server_error",
                code="redis_unavailable",
            )
            await self._send(protocol.command_error(down, request_id=request_id, tag=tag))

    async def _submit(self, command: protocol.Submit) -> None:
        self._check_room()
        body = command.body
        if not command.model_given:
            body = body.model_copy(update={"model": await self._default_model()})
        lease = await self._svc.limits.open_stream(self._caller)
        try:
            submitted = await self._svc.submissions.submit(
                body, stream_format="chat", caller=self._caller, idempotency_key=command.idempotency_key
            )
        except BaseException:
            self._svc.limits.close_stream(lease)
            raise
        await self._start(submitted.request_id, None, command.tag, resumed=False, lease=lease)

    async def _default_model(self) -> str:
        """The model of a request that names none: the only one live workers serve."""
        live = sorted(name for name, entry in (await self._svc.catalog.models()).items() if entry.live_workers)
        if len(live) != 1:
            raise bad_request(
                f"missing required parameter 'model' (served: {', '.join(live) or 'none'})",
                param="model",
                code="missing_parameter",
            )
        return live[0]

    def _check_room(self) -> None:
        if len(self._relays) >= MAX_STREAMS_PER_SOCKET:
            raise APIError(
                429,
                f"this socket already streams {MAX_STREAMS_PER_SOCKET} requests; wait for one to end",
                error_type="rate_limit_error",
                code="too_many_streams",
            )

    async def _start(
        self,
        request_id: str,
        last_event_id: str | None,
        tag: protocol.Tag,
        *,
        resumed: bool,
        lease: StreamLease | None = None,
    ) -> None:
        """Open a stream of the caller's request (checking the position as an SSE resume does), counted among
        its key's open streams (``lease``: the place already taken for it), then relay it."""
        limits = self._svc.limits
        try:
            if request_id in self._relays:
                raise APIError(
                    409, f"request {request_id} is already streaming on this socket", code="already_streaming"
                )
            self._check_room()
            if lease is None:
                lease = await limits.open_stream(self._caller)
            point = await self._svc.events.open(request_id, last_event_id, self._caller.owner)
            if resumed:
                await self._send(protocol.answer("resumed", request_id, tag, last_event_id=last_event_id))
            else:
                await self._send(protocol.answer("accepted", request_id, tag))
        except BaseException:
            if lease is not None:
                limits.close_stream(lease)
            raise
        task = asyncio.create_task(self._relay(point, tag), name=f"ws-relay-{request_id}")
        self._relays[request_id] = task
        held = lease

        def ended(task: asyncio.Task[None]) -> None:
            limits.close_stream(held)
            if self._relays.get(request_id) is task:
                del self._relays[request_id]
            if not task.cancelled() and task.exception() is not None:
                log.error("%s: WebSocket relay failed", request_id, exc_info=task.exception())

        task.add_done_callback(ended)

    async def _cancel(self, command: protocol.Cancel) -> None:
        request_id = command.request_id
        state = await self._svc.submissions.cancel(request_id, self._caller)
        await self._send(protocol.answer("cancel", request_id, command.tag, cancelled=True, state=state))

    # -- relaying one stream -------------------------------------------------------------------------

    async def _relay(self, point: ResumePoint, tag: protocol.Tag) -> None:
        """Send a request's events from the resume point to its terminal event, like ``sse_frames``:
        attached while it runs, queue positions while it waits, closed when its events stop coming."""
        events = self._svc.events
        settings = self._svc.settings
        meta = point.meta
        request_id = meta.request_id
        tick_s = min(settings.heartbeat_s, settings.queue_status_interval_s)
        connection_id: str | None = None
        seen_event = point.after_seq > 0
        last_event = time.monotonic()
        ended = "disconnected"
        if point.after_seq:
            events.metrics.resumes.inc()
            events.metrics.resume_backlog.observe(max(0, meta.last_seq - point.after_seq))
        try:
            if not meta.terminal:
                connection_id = events.attachments.attach(request_id)
            async for batch in events.batches(point, tick_s):
                if batch:
                    seen_event = True
                    last_event = time.monotonic()
                    for seq, payload in batch:
                        await self._relay_event(request_id, tag, seq, wire.decode(payload, wire.Event))
                    events.metrics.events_sent.inc(len(batch))
                    continue
                if not seen_event:
                    await self._report_queued(point)
                elif time.monotonic() - last_event >= settings.inter_token_timeout_s:
                    message = (
                        f"no event for {settings.inter_token_timeout_s:g}s; the request goes on: "
                        "resume with last_event_id"
                    )
                    await self._interrupted(request_id, tag, "inter_token_timeout", message)
                    ended = "error"
                    return
            ended = "done"
        except EventsExpiredError as exc:
            ended = "error"
            await self._interrupted(request_id, tag, "events_expired", f"cannot continue the stream: {exc}")
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            reraise_if_cancelling()
            ended = "error"
            log.warning("%s: Redis failed mid-stream: %s", request_id, exc, extra=about(request_id))
            message = "the request store (Redis) is unavailable; resume with last_event_id"
            await self._interrupted(request_id, tag, "redis_unavailable", message)
        except SocketGoneError:
            ended = "disconnected"
        finally:
            if connection_id is not None:
                events.attachments.detach(connection_id)
            log.info(
                "%s: WebSocket stream closed (%s), opened after event %d",
                request_id,
                ended,
                point.after_seq,
                extra=about(request_id),
            )

    async def _relay_event(self, request_id: str, tag: protocol.Tag, seq: int, event: wire.Event) -> None:
        if event.kind == "delta":
            await self._send(protocol.token(request_id, seq, event))
        elif event.kind == "handover":
            await self._send(protocol.handover(request_id, seq, event))
        elif event.kind == "end":
            await self._send(protocol.end_of(request_id, tag, seq, event))
        else:
            state, _ = await self._svc.store.state(request_id)
            await self._send(protocol.stream_error(request_id, tag, event.error_type, event.message))
            await self._send(protocol.done(request_id, tag, seq=seq, state=state or "failed"))

    async def _interrupted(self, request_id: str, tag: protocol.Tag, error_type: str, message: str) -> None:
        await self._send(protocol.stream_error(request_id, tag, error_type, message))
        await self._send(protocol.done(request_id, tag, seq=None, state="interrupted"))

    async def _report_queued(self, point: ResumePoint) -> None:
        """While the request waits for a worker, say how many wait; end it if it waited past the queue
        timeout (whichever sees that first ends it: a worker that pulls it, or a gateway streaming it)."""
        meta = point.meta
        state, _ = await self._svc.store.state(meta.request_id)
        if state != "queued":
            return
        settings = self._svc.settings
        waited_s = time.time() - meta.enqueued_ms / 1000
        if waited_s > settings.queue_timeout_s:
            message = f"timed out after {waited_s:.1f}s in the queue (queue timeout {settings.queue_timeout_s:g}s)"
            if await self._svc.store.expire_queued(meta.request_id, message):
                log.info("%s: %s", meta.request_id, message, extra=about(meta.request_id))
        waiting = await self._svc.store.queue_waiting(meta.model)
        await self._send(protocol.queued(meta.request_id, waiting))
