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
:mod:`tokenspool.gateway.auth`). Without a valid key the upgrade is refused with the HTTP API's 401 body. Every request
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

Each stream is one task relaying a stream session (:mod:`tokenspool.gateway.session`: the same attachment, queue
notices, timeouts and metrics as an SSE stream), which this module only encodes; closing the socket stops
the relays, not the requests (they get the disconnect grace period, as after an SSE disconnect). Everything
sent goes through one bounded queue per socket and one writer with a timeout on every send: a client that
stops reading is dropped, and meanwhile its relays wait (their live buffers overflow into catch-up reads
from Redis rather than growing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from tokenspool.gateway.auth import WS_PROTOCOL, Principal
from tokenspool.gateway.errors import REDIS_UNREACHABLE, APIError, rate_limited, redis_unavailable
from tokenspool.gateway.services import Services
from tokenspool.gateway.session import Events, Heartbeat, Queued, StreamItem, StreamSession, Transport
from tokenspool.gateway.transports import ws_protocol as protocol
from tokenspool.shared.aio import reraise_if_cancelling

log = logging.getLogger("tokenspool.gateway.websocket")

WEBSOCKET: Final = Transport("WebSocket", resume_hint="resume with last_event_id")
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
        services.metrics.count_error(refused)
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
        text = protocol.encode(message)
        with contextlib.suppress(asyncio.QueueFull):  # the common case: room now, and no timer to set
            self._outgoing.put_nowait(text)
            return
        try:
            async with asyncio.timeout(self._svc.settings.send_timeout_s):  # a timer, not a task per message
                await self._outgoing.put(text)
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
                async with asyncio.timeout(timeout_s):
                    await self._ws.send_text(text)
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
                await self._resume(command)
        except APIError as error:
            self._svc.metrics.count_error(error)
            await self._send(protocol.command_error(error, request_id=request_id, tag=tag))
        except REDIS_UNREACHABLE as exc:
            reraise_if_cancelling()
            log.warning("Redis unavailable: %s", exc)
            await self._send(protocol.command_error(redis_unavailable(), request_id=request_id, tag=tag))

    async def _submit(self, command: protocol.Submit) -> None:
        self._check_room()
        sessions = self._svc.sessions
        body = command.body
        if not command.model_given:
            body = body.model_copy(update={"model": await sessions.default_model()})
        session = await sessions.submit(
            self._caller, body, stream_format="chat", idempotency_key=command.idempotency_key, transport=WEBSOCKET
        )
        await self._start(session, command.tag, protocol.answer("accepted", session.request_id, command.tag))

    async def _resume(self, command: protocol.Resume) -> None:
        """Stream a request from a position (checked as an SSE resume is)."""
        self._check_room(command.request_id)
        session = await self._svc.sessions.resume(self._caller, command.request_id, command.last_event_id, WEBSOCKET)
        started = protocol.answer("resumed", command.request_id, command.tag, last_event_id=command.last_event_id)
        await self._start(session, command.tag, started)

    def _check_room(self, request_id: str | None = None) -> None:
        if request_id is not None and request_id in self._relays:
            raise APIError(409, f"request {request_id} is already streaming on this socket", code="already_streaming")
        if len(self._relays) >= MAX_STREAMS_PER_SOCKET:
            raise rate_limited(
                f"this socket already streams {MAX_STREAMS_PER_SOCKET} requests; wait for one to end",
                code="too_many_streams",
                retry_after_s=None,
            )

    async def _start(self, session: StreamSession, tag: protocol.Tag, started: dict[str, Any]) -> None:
        """Acknowledge a stream, then relay it in a task of its own; its session is closed when the task ends."""
        request_id = session.request_id
        try:
            self._check_room(request_id)  # an Idempotency-Key can name a request this socket streams
            await self._send(started)
        except BaseException:
            session.close()
            raise
        task = asyncio.create_task(self._relay(session, tag), name=f"ws-relay-{request_id}")
        self._relays[request_id] = task

        def ended(task: asyncio.Task[None]) -> None:
            session.close()
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

    async def _relay(self, session: StreamSession, tag: protocol.Tag) -> None:
        """Send what the session yields until it ends (or the socket goes)."""
        with contextlib.suppress(SocketGoneError):  # the socket's end ends the relay, not the request
            async with contextlib.aclosing(session.items()) as items:
                async for item in items:
                    for message in self._messages(session.request_id, tag, item):
                        await self._send(message)

    @staticmethod
    def _messages(request_id: str, tag: protocol.Tag, item: StreamItem) -> list[dict[str, Any]]:
        """A session's item as this protocol's messages."""
        if isinstance(item, Events):
            out = []
            for seq, event in item.events:
                if event.kind == "delta":
                    out.append(protocol.token(request_id, seq, event))
                elif event.kind == "handover":
                    out.append(protocol.handover(request_id, seq, event))
                elif event.kind == "end":
                    out.append(protocol.end_of(request_id, tag, seq, event))
                else:
                    out.append(protocol.stream_error(request_id, tag, event.error_type, event.message))
                    out.append(protocol.done(request_id, tag, seq=seq, state=item.final_state))
            return out
        if isinstance(item, Queued):
            return [protocol.queued(request_id, item.waiting)]
        if isinstance(item, Heartbeat):
            return []  # WebSocket has pings of its own
        return [
            protocol.stream_error(request_id, tag, item.code, item.message),
            protocol.done(request_id, tag, seq=None, state="interrupted"),
        ]
