"""The Responses API's HTTP routes (``/v1/responses``): parse, call :class:`ResponsesService`, answer with the
response object or stream its events as OpenAI does (named SSE events, each with a ``sequence_number``; no
``[DONE]``). No logic lives here."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Header, Query, Request
from starlette.responses import Response

from tokenspool.gateway.errors import ERROR_RESPONSES, APIError
from tokenspool.gateway.responses import ResponsesRequest, dump
from tokenspool.gateway.responses_service import ResponsesService, final_body, response_frames
from tokenspool.gateway.services import Caller, services
from tokenspool.gateway.transports.sse_stream import SSEResponse

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)
JSON_OR_SSE: dict[int | str, dict[str, Any]] = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}


def _service(request: Request) -> ResponsesService:
    return ResponsesService(services(request).sessions)


def _json(body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


@router.post("/responses", responses=JSON_OR_SSE)
async def create_response(
    request: Request, who: Caller, body: ResponsesRequest, idempotency_key: Annotated[str | None, Header()] = None
) -> Response:
    """Create a response: streamed (``stream``), run in the background (``background``: answered at once
    with status ``queued``, retrievable and resumable from any gateway), or answered when it ends."""
    service = _service(request)
    renderer, session = await service.create(who, body, idempotency_key)
    headers = {"X-Request-Id": renderer.meta.request_id}
    if session is None:
        return _json(final_body(renderer, "queued"), headers)
    if body.stream:
        frames = response_frames(session, renderer, -1)
        send_timeout_s = service.settings.send_timeout_s
        return SSEResponse(frames, send_timeout_s=send_timeout_s, headers=headers, on_close=session.close)
    try:
        deltas, last = await session.collect()
    finally:
        session.close()
    if last.kind == "error" and last.error_type == "invalid_request_error":
        raise APIError(400, last.message, code="invalid_request", headers=headers)
    renderer.start()
    for event in [*deltas, last]:
        renderer.feed(event)
    return _json(final_body(renderer), headers)


@router.get("/responses/{response_id}", responses=JSON_OR_SSE)
async def retrieve_response(
    response_id: str,
    request: Request,
    who: Caller,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=-1)] = None,
) -> Response:
    """The response object, or (``stream=true``) its events after ``starting_after``, then live, from any
    gateway."""
    service = _service(request)
    if not stream:
        return _json(dump(await service.retrieve(who, response_id)))
    renderer, session = await service.resume(who, response_id, starting_after)
    frames = response_frames(session, renderer, -1 if starting_after is None else starting_after)
    return SSEResponse(
        frames,
        send_timeout_s=service.settings.send_timeout_s,
        headers={"X-Request-Id": response_id},
        on_close=session.close,
    )


@router.post("/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request, who: Caller) -> Response:
    """Cancel a background response; answered with the response once it stopped."""
    return _json(dump(await _service(request).cancel(who, response_id)))


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request, who: Caller) -> Response:
    await _service(request).delete(who, response_id)
    return _json({"id": response_id, "object": "response", "deleted": True})


@router.get("/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    request: Request,
    who: Caller,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: Annotated[str | None, Query(max_length=256)] = None,
) -> Response:
    items = await _service(request).input_items(who, response_id, limit=limit, order=order, after=after)
    return _json(dump(items))
