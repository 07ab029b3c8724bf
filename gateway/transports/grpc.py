"""The gRPC transport: ``ChatService`` (``gateway/proto/tokenspool_chat.proto``) on its own port, in the
gateway process, on its event loop, from the same services as the HTTP API: requests are validated by the
same schemas and enqueued by :class:`SubmissionService`; a stream is a stream session
(:mod:`tokenspool.gateway.session`: the same attachment, queue notices, timeouts and metrics as SSE), which this module
only encodes, so a client whose call drops has the same grace period to resume, over gRPC or HTTP, on any
gateway, and loses nothing.

The HTTP API's answers in gRPC's terms:

==========================================  ======================  ==========================================
HTTP                                        gRPC status             when
==========================================  ======================  ==========================================
401                                         UNAUTHENTICATED         no valid API key in the ``authorization``
                                                                    metadata (``Bearer KEY``) when the
                                                                    gateway has keys
400                                         INVALID_ARGUMENT        a bad parameter, a malformed or foreign
                                                                    event id (the same message as over HTTP)
404                                         NOT_FOUND               unknown model, unknown request (or
                                                                    another key's: the same answer)
409                                         FAILED_PRECONDITION     cancelling a request that already ended
410                                         OUT_OF_RANGE            a resume from before the events still kept
                                                                    (like reading a log from a trimmed offset:
                                                                    retrying cannot help, unlike UNAVAILABLE)
413                                         RESOURCE_EXHAUSTED      gRPC's own, for a message over
                                                                    ``max_body_bytes``
422                                         ALREADY_EXISTS          an idempotency_key already used for
                                                                    another request
429                                         RESOURCE_EXHAUSTED      the model's queue is full, or the key's
                                                                    requests per minute or open streams
                                                                    are used up; retry later
503                                         UNAVAILABLE             Redis is unreachable; retry later
==========================================  ======================  ==========================================

A stream that cannot go on after it began ends with UNAVAILABLE (Redis lost mid-stream, or no event within
``inter_token_timeout_s``: resume from the last ``event_id``) or OUT_OF_RANGE (its events expired). A
request that failed or was cancelled is not a failed call: its stored error event is an ERROR response
with an ``event_id`` (a replay shows it again) and the call ends OK, as SSE sends an error event and
``[DONE]``. In ``BiStreamChat`` every one of these is an ERROR response about that request (``error.status``
is the code) and the call goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from pydantic import ValidationError

from tokenspool.gateway.auth import Principal
from tokenspool.gateway.errors import REDIS_UNREACHABLE, APIError, bad_request, redis_unavailable, validation_error
from tokenspool.gateway.metrics import GatewayMetrics
from tokenspool.gateway.proto import tokenspool_chat_pb2 as pb
from tokenspool.gateway.proto import tokenspool_chat_pb2_grpc as pb_grpc
from tokenspool.gateway.reader import parse_resume_id
from tokenspool.gateway.schemas import ChatCompletionRequest
from tokenspool.gateway.services import Services
from tokenspool.gateway.session import Events, Heartbeat, Queued, StreamSession, Transport
from tokenspool.gateway.settings import GatewaySettings
from tokenspool.shared import keys, wire
from tokenspool.shared.aio import reraise_if_cancelling
from tokenspool.shared.store import RequestMeta

log = logging.getLogger("tokenspool.gateway.grpc")

GRPC: Final = Transport("gRPC", resume_hint="resume from the last event_id")

STOP_GRACE_S = 1.0
"""On shutdown, how long open calls may go on before they are cancelled (their clients then resume elsewhere)."""
OUTBOX_RESPONSES = 64
"""Responses of one BiStreamChat call waiting for the client; its streams wait (and fall back to range
reads from Redis) while it is full."""
MAX_STREAMS_PER_CALL = 64
"""Requests one BiStreamChat call may stream at once."""

_BY_HTTP_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    410: grpc.StatusCode.OUT_OF_RANGE,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.ALREADY_EXISTS,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
_BY_STORED_ERROR: dict[str, grpc.StatusCode] = {
    "cancelled": grpc.StatusCode.CANCELLED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "queue_timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
}
_OPTIONAL_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
_GENERATION_FIELDS = (
    "prompt",
    "model",
    "messages",
    *_OPTIONAL_FIELDS,
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "background",
    "user",
    "idempotency_key",
)

Emit = Callable[[pb.ChatResponse], Awaitable[None]]


def status_number(code: grpc.StatusCode) -> int:
    number: int = code.value[0]
    return number


class Refusal(Exception):
    """Why a call (StreamChat, Cancel) or one request of a BiStreamChat call cannot be served, in gRPC's terms."""

    def __init__(self, status: grpc.StatusCode, code: str, message: str, *, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @classmethod
    def of(cls, error: APIError) -> Refusal:
        status = _BY_HTTP_STATUS.get(error.status, grpc.StatusCode.INTERNAL)
        code = str(error.code or error.error_type)
        return cls(status, code, error.message, retry_after=error.headers.get("Retry-After"))

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """The error code (the HTTP API's ``error.code``) and any retry hint, for clients that branch on them."""
        out = [("tokenspool-error-code", self.code)]
        if self.retry_after is not None:
            out.append(("retry-after", self.retry_after))
        return tuple(out)

    def error(self) -> pb.Error:
        return pb.Error(code=self.code, message=self.message, status=status_number(self.status))


class ChatService:
    """The servicer. StreamChat writes with ``context.write`` (not by yielding) so that every write has
    the send timeout; BiStreamChat runs one task per stream, all writing through one bounded outbox."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.sessions = services.sessions
        self.metrics = services.metrics

    # -- RPCs ---------------------------------------------------------------------------------------------

    async def StreamChat(self, request: pb.ChatRequest, context: Any) -> None:
        opened = time.monotonic()

        async def emit(response: pb.ChatResponse) -> None:
            await self._send(context, response)

        try:
            caller = self._caller(context)
            if request.WhichOneof("action") == "cancel":
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "invalid_value",
                    "StreamChat does not take a cancel: call Cancel (or send it on BiStreamChat)",
                )
            session, accepted = await self._open(request, caller)
            try:
                await context.send_initial_metadata((("x-request-id", session.request_id),))
                if accepted:
                    await emit(self._notice(session.request_id, request.tag, pb.ChatResponse.ACCEPTED, "", opened))
                await self._relay(session, request.tag, emit, opened)
            finally:
                session.close()
        except Refusal as refusal:
            await context.abort(refusal.status, refusal.message, refusal.trailers())

    async def BiStreamChat(self, request_iterator: AsyncIterator[pb.ChatRequest], context: Any) -> None:
        opened = time.monotonic()
        try:
            caller = self._caller(context)
        except Refusal as refusal:
            await context.abort(refusal.status, refusal.message, refusal.trailers())
        outbox: asyncio.Queue[pb.ChatResponse | None] = asyncio.Queue(maxsize=OUTBOX_RESPONSES)
        live: set[asyncio.Task[None]] = set()

        async def read_commands(group: asyncio.TaskGroup) -> None:
            async for request in request_iterator:
                await self._command(request, caller, outbox.put, group, live, opened)
            while live:  # the client half-closed: the call ends when its streams have
                await asyncio.wait(set(live))
            await outbox.put(None)

        async def write_responses() -> None:
            while (response := await outbox.get()) is not None:
                await self._send(context, response)

        stalled: BaseException | None = None
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(read_commands(group))
                group.create_task(write_responses())
        except* Refusal as failed:  # only the writer raises one: the client stopped reading
            stalled = failed.exceptions[0]
        if isinstance(stalled, Refusal):
            await context.abort(stalled.status, stalled.message, stalled.trailers())

    async def Cancel(self, request: pb.CancelRequest, context: Any) -> pb.CancelResponse:
        try:
            request_id, state = await self._cancel(request.request_id, self._caller(context))
        except Refusal as refusal:
            await context.abort(refusal.status, refusal.message, refusal.trailers())
        return pb.CancelResponse(request_id=request_id, state=state)

    def _caller(self, context: Any) -> Principal:
        """The API key in the call's ``authorization`` metadata (``Bearer KEY``); UNAUTHENTICATED if needed
        and missing or unknown."""
        metadata = context.invocation_metadata() or ()
        header = next((str(value) for key, value in metadata if key == "authorization"), None)
        with _refusals(self.metrics):
            return self.services.keys.from_authorization(header)

    # -- the work -----------------------------------------------------------------------------------------

    async def _command(
        self,
        request: pb.ChatRequest,
        caller: Principal,
        emit: Emit,
        group: asyncio.TaskGroup,
        live: set[asyncio.Task[None]],
        opened: float,
    ) -> None:
        """One message of a BiStreamChat call: cancel, or open a stream and start its task."""
        tag = request.tag
        action = request.WhichOneof("action")
        if action == "cancel":
            try:
                request_id, state = await self._cancel(request.cancel.request_id, caller)
            except Refusal as refusal:
                await emit(self._failure(request.cancel.request_id, tag, refusal, opened))
                return
            await emit(self._notice(request_id, tag, pb.ChatResponse.CANCELLING, state, opened))
            return
        named = request.resume.request_id if action == "resume" else ""
        if len(live) >= MAX_STREAMS_PER_CALL:
            too_many = Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too_many_streams",
                f"this call already streams {MAX_STREAMS_PER_CALL} requests; wait for one to end or open another call",
            )
            await emit(self._failure(named, tag, too_many, opened))
            return
        try:
            session, accepted = await self._open(request, caller)
        except Refusal as refused:
            await emit(self._failure(named, tag, refused, opened))
            return
        try:
            if accepted:
                await emit(self._notice(session.request_id, tag, pb.ChatResponse.ACCEPTED, "", opened))
            task = group.create_task(self._stream_in_call(session, tag, emit, opened))
        except BaseException:
            session.close()
            raise
        live.add(task)
        task.add_done_callback(live.discard)
        task.add_done_callback(lambda _task: session.close())

    async def _stream_in_call(self, session: StreamSession, tag: str, emit: Emit, opened: float) -> None:
        try:
            await self._relay(session, tag, emit, opened)
        except Refusal as refusal:
            await emit(self._failure(session.request_id, tag, refusal, opened))

    async def _open(self, request: pb.ChatRequest, caller: Principal) -> tuple[StreamSession, bool]:
        """A stream of the caller's: of a new submission (True), or from the resume position it names; it
        holds the stream's place among the key's open streams until the caller closes it."""
        with _refusals(self.metrics):
            if request.WhichOneof("action") == "resume":
                given = [name for name in _GENERATION_FIELDS if _is_set(request, name)]
                if given:
                    raise bad_request(
                        f"a resume takes only request_id and last_event_id (got {given[0]!r})", param=given[0]
                    )
                request_id, last_event_id = request.resume.request_id, request.resume.last_event_id
                if not request_id:
                    if not last_event_id:
                        raise bad_request("a resume needs request_id or last_event_id", param="resume.request_id")
                    request_id, _ = parse_resume_id(last_event_id)
                return await self.sessions.resume(caller, request_id, last_event_id or None, GRPC), False
            body = await self._body(request)
            session = await self.sessions.submit(
                caller, body, stream_format="chat", idempotency_key=request.idempotency_key or None, transport=GRPC
            )
            return session, True

    async def _body(self, request: pb.ChatRequest) -> ChatCompletionRequest:
        """The request as the HTTP API's chat schema, so the same rules (and messages) apply."""
        if request.prompt and request.messages:
            raise bad_request("give either 'prompt' or 'messages', not both", param="prompt")
        if not request.prompt and not request.messages:
            raise bad_request("missing required parameter 'messages' (or 'prompt')", param="messages")
        messages: list[dict[str, Any]] = [
            {"role": m.role, "content": m.content, **({"name": m.name} if m.HasField("name") else {})}
            for m in request.messages
        ] or [{"role": "user", "content": request.prompt}]
        raw: dict[str, Any] = {
            "model": request.model or await self.sessions.default_model(),
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        raw.update({name: getattr(request, name) for name in _OPTIONAL_FIELDS if request.HasField(name)})
        if request.stop:
            raw["stop"] = list(request.stop)
        if request.stop_token_ids:
            raw["stop_token_ids"] = list(request.stop_token_ids)
        for flag in ("ignore_eos", "background"):
            if getattr(request, flag):
                raw[flag] = True
        if request.user:
            raw["user"] = request.user
        try:
            return ChatCompletionRequest.model_validate(raw)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None

    async def _cancel(self, request_id: str, caller: Principal) -> tuple[str, str]:
        """(request id, "cancelled" or "cancelling"), as ``DELETE /v1/requests/{id}`` answers."""
        with _refusals(self.metrics):
            if not request_id:
                raise bad_request("missing required parameter 'request_id'", param="request_id")
            return request_id, await self.services.submissions.cancel(request_id, caller)

    async def _relay(self, session: StreamSession, tag: str, emit: Emit, opened: float) -> None:
        """Send what the session yields until the request's terminal event. Raises :class:`Refusal` when the
        stream cannot go on; cancellation goes through untouched."""
        meta = session.point.meta
        async with aclosing(session.items()) as items:
            async for item in items:
                if isinstance(item, Events):
                    for seq, event in item.events:
                        await emit(self._event(meta, seq, event, tag, opened))
                elif isinstance(item, Queued):
                    await emit(self._notice(meta.request_id, tag, pb.ChatResponse.QUEUED, item.notice(), opened))
                elif isinstance(item, Heartbeat):
                    continue  # the server's keepalive pings show the call is alive
                else:
                    status = _BY_HTTP_STATUS.get(item.status, grpc.StatusCode.UNAVAILABLE)
                    raise Refusal(status, item.code, item.message)

    async def _send(self, context: Any, response: pb.ChatResponse) -> None:
        try:
            async with asyncio.timeout(self.settings.send_timeout_s):  # a timer, not a task per message
                await context.write(response)
        except TimeoutError:
            reraise_if_cancelling()
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE,
                "send_timeout",
                f"the client accepted no message for {self.settings.send_timeout_s:g}s",
            ) from None

    # -- responses ----------------------------------------------------------------------------------------

    @staticmethod
    def _event(meta: RequestMeta, seq: int, event: wire.Event, tag: str, opened: float) -> pb.ChatResponse:
        """One stored event as a response; like SSE frames, it depends only on the event and the request."""
        response = pb.ChatResponse(
            request_id=meta.request_id,
            event_id=keys.event_id(meta.request_id, seq),
            tag=tag,
            latency_ms=(time.monotonic() - opened) * 1000,
        )
        if event.kind == "delta":
            response.kind = pb.ChatResponse.DELTA
            response.content = response.token = event.text
            response.finish_reason = event.finish_reason or ""
            response.index = event.index
            response.reasoning = event.reasoning
            response.tool_calls = event.tool_calls
        elif event.kind == "handover":
            response.kind = pb.ChatResponse.HANDOVER
            response.notice = event.message
        elif event.kind == "end":
            response.kind = pb.ChatResponse.END
            response.done = True
            response.finish_reason = event.finish_reason or ""
            response.usage.CopyFrom(
                pb.Usage(
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    total_tokens=event.prompt_tokens + event.completion_tokens,
                )
            )
        else:
            status = _BY_STORED_ERROR.get(event.error_type, grpc.StatusCode.INTERNAL)
            response.kind = pb.ChatResponse.ERROR
            response.done = True
            error = pb.Error(code=event.error_type, message=event.message, status=status_number(status))
            response.error.CopyFrom(error)
        return response

    @staticmethod
    def _notice(request_id: str, tag: str, kind: pb.ChatResponse.Kind, notice: str, opened: float) -> pb.ChatResponse:
        return pb.ChatResponse(
            request_id=request_id, tag=tag, kind=kind, notice=notice, latency_ms=(time.monotonic() - opened) * 1000
        )

    @staticmethod
    def _failure(request_id: str, tag: str, refusal: Refusal, opened: float) -> pb.ChatResponse:
        return pb.ChatResponse(
            request_id=request_id,
            tag=tag,
            kind=pb.ChatResponse.ERROR,
            done=True,
            error=refusal.error(),
            latency_ms=(time.monotonic() - opened) * 1000,
        )


def _is_set(request: pb.ChatRequest, name: str) -> bool:
    return request.HasField(name) if name in _OPTIONAL_FIELDS else bool(getattr(request, name))


@contextlib.contextmanager
def _refusals(metrics: GatewayMetrics) -> Iterator[None]:
    """The services' API errors, and an unreachable Redis, as refusals (counted like the HTTP API's errors)."""
    try:
        yield
    except APIError as exc:
        metrics.count_error(exc)
        raise Refusal.of(exc) from None
    except REDIS_UNREACHABLE as exc:
        reraise_if_cancelling()
        log.warning("Redis unavailable: %s", exc)
        down = redis_unavailable()
        metrics.count_error(down)
        raise Refusal.of(down) from None


class Undecodable:
    """A request message that did not parse, e.g. a string field that is not UTF-8 (protobuf's rule, which
    a lone UTF-16 surrogate breaks): stands in for the message until the call can be refused."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class RefuseUndecodable(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers a request message that does not parse with INVALID_ARGUMENT, like any bad parameter, where a
    failing deserializer would make it UNKNOWN (a server error). Wraps every method's handler: the
    deserializer returns :class:`Undecodable` instead of raising, and the call is refused when it meets one."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer

        def parse(data: bytes) -> Any:
            try:
                return deserialize(data)
            except DecodeError as exc:
                return Undecodable(str(exc))

        async def refuse_if_undecodable(request: Any, context: Any) -> None:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse: {request.reason}")

        async def run(behavior: Any, request: Any, context: Any) -> Any:
            """The method's answer; a streaming one (an async generator) is written out here."""
            result = behavior(request, context)
            if not inspect.isasyncgen(result):
                return await result
            async for response in result:
                await context.write(response)
            return None

        async def checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for request in requests:
                await refuse_if_undecodable(request, context)
                yield request

        async def one_request(request: Any, context: Any) -> Any:
            await refuse_if_undecodable(request, context)
            return await run(behavior, request, context)

        async def request_stream(requests: AsyncIterator[Any], context: Any) -> Any:
            return await run(behavior, checked(requests, context), context)

        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            behavior = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(one_request, parse, serialize)
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(one_request, parse, serialize)
        if handler.stream_unary is not None:
            behavior = handler.stream_unary
            return grpc.stream_unary_rpc_method_handler(request_stream, parse, serialize)
        behavior = handler.stream_stream
        return grpc.stream_stream_rpc_method_handler(request_stream, parse, serialize)


class GrpcServer:
    """ChatService on ``settings.grpc_port``, served by the gateway's own event loop and services."""

    def __init__(self, services: Services, settings: GatewaySettings) -> None:
        assert settings.grpc_port is not None
        self._settings = settings
        self._server = grpc.aio.server(
            interceptors=[RefuseUndecodable()],
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                # Pings find clients that vanished without closing, as SSE's heartbeats do, so their
                # attachments end and their requests are not generated for nobody.
                ("grpc.keepalive_time_ms", int(max(settings.heartbeat_s, 1.0) * 1000)),
                ("grpc.keepalive_timeout_ms", int(settings.send_timeout_s * 1000)),
            ],
        )
        pb_grpc.add_ChatServiceServicer_to_server(ChatService(services), self._server)

    async def start(self) -> int:
        """Listen and serve; the bound port. Fails (so the gateway does not start) when the port is taken."""
        host = self._settings.host
        address = f"[{host}]:{self._settings.grpc_port}" if ":" in host else f"{host}:{self._settings.grpc_port}"
        port: int = self._server.add_insecure_port(address)
        await self._server.start()
        log.info("gRPC ChatService listening on %s", address.rpartition(":")[0] + f":{port}")
        return port

    async def stop(self) -> None:
        """Refuse new calls; give open ones :data:`STOP_GRACE_S`, then cancel them (their clients resume)."""
        await self._server.stop(STOP_GRACE_S)
