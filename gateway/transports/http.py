"""The HTTP API's routes: parse the request, call a service, map the result to a response (streams through
:mod:`tokenspool.gateway.transports.sse_stream`). No logic lives here."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Annotated, Any, Final

import orjson
from fastapi import APIRouter, Header, Query, Request
from pydantic import ValidationError
from starlette.responses import Response

from tokenspool.gateway.auth import Principal
from tokenspool.gateway.catalog import ModelEntry
from tokenspool.gateway.chunks import completion_body, usage_body
from tokenspool.gateway.errors import (
    ERROR_RESPONSES,
    REDIS_UNREACHABLE,
    APIError,
    bad_request,
    engine_refusal,
    not_found,
    validation_error,
)
from tokenspool.gateway.reader import parse_resume_id
from tokenspool.gateway.schemas import ChatCompletionRequest, ChatMessageIn, CompletionRequest
from tokenspool.gateway.services import BEARER_SCHEME, BareCaller, Caller, Services, services
from tokenspool.gateway.transports.sse_stream import SSE, open_sse, sse_response, wants_event_ids
from tokenspool.shared.aio import reraise_if_cancelling
from tokenspool.shared.store import StreamFormat

router = APIRouter()
api = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)
"""The API proper: authenticated, its errors documented."""
JSON_OR_SSE: dict[int | str, dict[str, Any]] = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}
SSE_ONLY: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


async def _sse(svc: Services, caller: Principal, request_id: str, last_event_id: str | None) -> Response:
    """A stream of the caller's request after a position (with ids: it is a resume), counted among its key's
    open streams; 204 when the position is the last event of a request that has ended, which tells an
    EventSource to stop reconnecting (what the specification gives for that)."""
    headers = {"X-Request-Id": request_id}
    session = await svc.sessions.resume(caller, request_id, last_event_id, SSE)
    if session.point.at_end:
        session.close()
        return Response(status_code=204, headers=headers)
    return sse_response(session, send_timeout_s=svc.settings.send_timeout_s, headers=headers)


LastEventIdHeader = Annotated[str | None, Header(alias="Last-Event-ID")]


@dataclass(frozen=True, slots=True)
class GenerationHeaders:
    """What a generation POST's headers say: the request it names (``Idempotency-Key``), whether its events
    carry ids (:func:`wants_event_ids`), and the event a retried POST continues after (``Last-Event-ID``)."""

    idempotency_key: str | None
    event_ids: bool
    last_event_id: str | None

    @classmethod
    def of(cls, request: Request) -> GenerationHeaders:
        headers = request.headers
        idempotency_key = headers.get("idempotency-key")
        accept = headers.get("accept")
        return cls(
            idempotency_key, wants_event_ids(accept, idempotency_key=idempotency_key), headers.get("last-event-id")
        )


def _optional_header(name: str, title: str) -> dict[str, Any]:
    schema = {"anyOf": [{"type": "string"}, {"type": "null"}], "title": title}
    return {"in": "header", "name": name, "required": False, "schema": schema}


GENERATION_OPENAPI: Final[dict[str, Any]] = {
    "parameters": [
        _optional_header("idempotency-key", "Idempotency-Key"),
        _optional_header("accept", "Accept"),
        _optional_header("Last-Event-ID", "Last-Event-Id"),
    ],
    "security": [{BEARER_SCHEME: []}],
}
"""The generation routes take their caller from one dependency on the request alone (:data:`BareCaller`) and
read their headers themselves (:meth:`GenerationHeaders.of`): solving an HTTPBearer sub-dependency and three
header parameters, each validated on its own, was a large share of a gateway's CPU per one-token request
(docs/benchmarks.md). The OpenAPI document still shows the headers and the API key, as they were declared."""


async def _generate(
    svc: Services,
    caller: Principal,
    body: ChatCompletionRequest | CompletionRequest,
    stream_format: StreamFormat,
    sent: GenerationHeaders,
) -> Response:
    idempotency_key, event_ids, last_event_id = sent.idempotency_key, sent.event_ids, sent.last_event_id
    if body.stream and last_event_id:
        # A reconnect (as @microsoft/fetch-event-source retries a POST). At the request's end it answers
        # [DONE] with 200, not the GET streams' 204: such a client expects an event stream, and its default
        # onopen would take a 204 for an error and retry for ever (an EventSource never POSTs).
        session = await svc.sessions.reconnect(
            caller, body, idempotency_key=idempotency_key, last_event_id=last_event_id, transport=SSE
        )
        headers = {"X-Request-Id": session.request_id}
        return sse_response(session, send_timeout_s=svc.settings.send_timeout_s, headers=headers)
    session = await svc.sessions.submit(
        caller, body, stream_format=stream_format, idempotency_key=idempotency_key, transport=SSE
    )
    headers = {"X-Request-Id": session.request_id}
    if body.stream:
        model = (await svc.catalog.models()).get(body.model)
        timeout_s = svc.settings.send_timeout_s
        if model is not None and model.refuses_late:
            return await open_sse(session, send_timeout_s=timeout_s, headers=headers, event_ids=event_ids)
        return sse_response(session, send_timeout_s=timeout_s, headers=headers, event_ids=event_ids)
    try:
        deltas, last = await session.collect()
    finally:
        session.close()
    refusal = None if deltas else engine_refusal(last)
    if refusal is not None:
        refusal.headers.update(headers)
        raise refusal
    if last.kind == "error":
        status = 409 if last.error_type == "cancelled" else 500
        raise APIError(status, last.message, error_type=last.error_type, code=last.error_type, headers=headers)
    return _json(completion_body(session.point.meta, deltas, last), headers=headers)


@api.post("/chat/completions", responses=JSON_OR_SSE, openapi_extra=GENERATION_OPENAPI)
async def chat_completions(body: ChatCompletionRequest, request: Request, who: BareCaller) -> Response:
    return await _generate(services(request), who, body, "chat", GenerationHeaders.of(request))


@api.post("/completions", responses=JSON_OR_SSE, openapi_extra=GENERATION_OPENAPI)
async def completions(body: CompletionRequest, request: Request, who: BareCaller) -> Response:
    return await _generate(services(request), who, body, "completion", GenerationHeaders.of(request))


@api.get("/chat/completions/stream", responses=SSE_ONLY)
async def simple_stream(
    request: Request,
    who: Caller,
    prompt: Annotated[str | None, Query(max_length=100_000)] = None,
    model: Annotated[str | None, Query(max_length=256)] = None,
    max_tokens: Annotated[int | None, Query()] = None,
    temperature: Annotated[float | None, Query()] = None,
    seed: Annotated[int | None, Query()] = None,
    last_event_id: Annotated[str | None, Query()] = None,
    last_event_id_header: LastEventIdHeader = None,
) -> Response:
    """The seed document's GET form for ``EventSource``: ``{"token": ..., "done": ...}`` events, resumable."""
    svc = services(request)
    resume = last_event_id_header or last_event_id
    if resume:
        request_id, _ = parse_resume_id(resume)
        return await _sse(svc, who, request_id, resume)
    if not prompt:
        raise bad_request("the query parameter 'prompt' is required", param="prompt")
    if model is None:
        model = await svc.sessions.default_model()
    try:
        body = ChatCompletionRequest(
            model=model,
            messages=[ChatMessageIn(role="user", content=prompt)],
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            stream=True,
        )
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    return await _generate(svc, who, body, "simple", GenerationHeaders(None, event_ids=True, last_event_id=None))


@api.get("/requests/{request_id}/events", responses=SSE_ONLY)
async def request_events(
    request_id: str,
    request: Request,
    who: Caller,
    last_event_id: Annotated[str | None, Query()] = None,
    last_event_id_header: LastEventIdHeader = None,
) -> Response:
    """A request's events from any gateway, after ``Last-Event-ID`` (header, else query), then live."""
    return await _sse(services(request), who, request_id, last_event_id_header or last_event_id)


@api.get("/requests/{request_id}")
async def request_status(request_id: str, request: Request, who: Caller) -> Response:
    meta = await services(request).submissions.status(request_id, who)
    return _json(
        {
            "id": meta.request_id,
            "object": "tokenspool.request",
            "state": meta.state,
            "model": meta.model,
            "kind": meta.kind,
            "worker": meta.worker or None,
            "attempt": meta.attempt,
            "events": meta.last_seq,
            "finish_reason": meta.finish_reason or None,
            "usage": usage_body(meta.prompt_tokens, meta.completion_tokens) if meta.terminal else None,
            "error": meta.error or None,
            "cancel_requested": meta.cancel_requested,
            "created": meta.created_s,
            "enqueued_at_ms": meta.enqueued_ms,
            "started_at_ms": meta.started_ms or None,
            "finished_at_ms": meta.finished_ms or None,
        }
    )


@api.delete("/requests/{request_id}", responses={202: {"description": "a running request is being stopped"}})
async def cancel_request(request_id: str, request: Request, who: Caller) -> Response:
    """Stop a request: at once when queued, within one engine step when running."""
    state = await services(request).submissions.cancel(request_id, who)
    return _json(
        {"id": request_id, "object": "tokenspool.request", "cancelled": True, "state": state},
        status=200 if state == "cancelled" else 202,
    )


def _model_card(entry: ModelEntry) -> dict[str, Any]:
    """A model as ``vllm serve`` lists it (its ``max_model_len`` is the smallest of its workers', null when
    none reports one)."""
    return {
        "id": entry.name,
        "object": "model",
        "created": entry.last_seen_ms // 1000,
        "owned_by": entry.owned_by,
        "max_model_len": entry.max_model_len or None,
    }


@api.get("/models")
async def list_models(request: Request, _who: Caller) -> Response:
    models = await services(request).catalog.models()
    data = [_model_card(entry) for entry in sorted(models.values(), key=lambda e: e.name) if entry.live_workers]
    return _json({"object": "list", "data": data})


@api.get("/models/{model:path}")
async def retrieve_model(model: str, request: Request, _who: Caller) -> Response:
    """One model (OpenAI's retrieve; ``vllm serve`` 0.32 has no such route): 404 ``model_not_found`` unless a
    live worker serves it. The path may hold slashes, as Hugging Face model ids do."""
    entry = (await services(request).catalog.models()).get(model)
    if entry is None or not entry.live_workers:
        raise not_found(f"the model {model!r} does not exist or no worker serves it", code="model_not_found")
    return _json(_model_card(entry))


@router.get("/healthz")
async def healthz() -> Response:
    return _json({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    svc = services(request)
    await svc.store.redis.ping()
    return _json({"status": "ready"})


@router.get(
    "/health",
    response_class=Response,
    responses={200: {"description": "serving (an empty body)"}, 503: {"description": "Redis is unreachable"}},
)
async def health(request: Request) -> Response:
    """As ``vllm serve`` answers it: 200 with an empty body while this gateway can serve (it reaches Redis),
    503 (also empty) when it cannot."""
    try:
        await services(request).store.redis.ping()
    except REDIS_UNREACHABLE:
        reraise_if_cancelling()
        return Response(status_code=503)
    return Response(status_code=200)


@router.get("/version")
async def version() -> Response:
    """As ``vllm serve`` answers it, ``{"version": ...}``: tokenspool's version."""
    try:
        installed = importlib.metadata.version("tokenspool")
    except importlib.metadata.PackageNotFoundError:
        installed = "unknown"
    return _json({"version": installed})


router.include_router(api)
