"""The Responses API's service: create a response (a chat request in the store), open its stream from any
gateway at any sequence number, and answer about a stored response (object, input items), cancel and
delete it, each for its owner only (another key's response is a 404, like an unknown id).

Nothing here is per gateway: a response lives in Redis, so every call may land on any gateway, during or
after the response's run, until its retention ends (``retention_s`` after it ends, as every request's
events; the metadata answers 410 for ``tombstone_s`` more).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
from openai.types.responses import Response, ResponseErrorEvent, ResponseItemList

from tokenspool.gateway.auth import Principal
from tokenspool.gateway.errors import APIError, bad_request
from tokenspool.gateway.reader import EventsExpiredError, ResumePoint
from tokenspool.gateway.responses import (
    ResponseRenderer,
    ResponsesRequest,
    dump,
    event_frame,
    input_items,
    listed_item,
    output_items,
    to_chat,
)
from tokenspool.gateway.session import Events, Heartbeat, Queued, StreamSession, StreamSessions, Transport
from tokenspool.gateway.sse import comment_frame
from tokenspool.shared import handover, keys, wire
from tokenspool.shared.store import RequestMeta

RESPONSES_SSE: Final = Transport("SSE", resume_hint="resume with GET /v1/responses/{id}?stream=true&starting_after=N")
CANCEL_WAIT_S: Final = 10.0
"""How long a cancel waits for the worker to stop a running response before answering with what it has."""
STATUS_OF_STATE: Final[dict[str, Literal["queued", "in_progress"]]] = {"queued": "queued", "running": "in_progress"}


@dataclass(frozen=True, slots=True)
class Stored:
    """A stored response: its metadata and the Responses request it was created from."""

    meta: RequestMeta
    request: ResponsesRequest


def _not_found(response_id: str, param: str | None, why: str = "") -> APIError:
    return APIError(
        404,
        f"Response with id '{response_id}' not found{why}.",
        error_type="invalid_request_error",
        param=param or "response_id",
        code="response_not_found",
    )


class ResponsesService:
    def __init__(self, sessions: StreamSessions) -> None:
        self.sessions = sessions
        self.store = sessions.store
        self.settings = sessions.settings

    # -- create

    async def create(
        self, caller: Principal, request: ResponsesRequest, idempotency_key: str | None
    ) -> tuple[ResponseRenderer, StreamSession | None]:
        """Enqueue a response. A stream or a wait gets its session (the caller closes it); a background
        response that is not streamed gets none: its renderer says ``queued``."""
        model = request.model or await self.sessions.default_model()
        history: list[dict[str, Any]] = []
        previous: list[dict[str, Any]] = []
        if request.previous_response_id is not None:
            history, previous = await self._conversation(caller, request.previous_response_id)
        chat = to_chat(request, model, history, previous)
        if request.background and not request.stream:
            submitted = await self.sessions.submissions.submit(
                chat, stream_format="response", caller=caller, idempotency_key=idempotency_key
            )
            meta = submitted.meta or await self._meta(caller, submitted.request_id)
            return ResponseRenderer(meta, request), None
        session = await self.sessions.submit(
            caller, chat, stream_format="response", idempotency_key=idempotency_key, transport=RESPONSES_SSE
        )
        return ResponseRenderer(session.point.meta, request), session

    async def _conversation(
        self, caller: Principal, previous_id: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The chat messages and the output of a finished earlier response of the caller's."""
        stored = await self.stored(caller, previous_id, param="previous_response_id")
        if stored.meta.state != "done":
            raise bad_request(
                f"previous response {previous_id} is {STATUS_OF_STATE.get(stored.meta.state, stored.meta.state)}; "
                "only a finished response can be continued",
                param="previous_response_id",
                code="previous_response_not_finished",
            )
        job = await self.store.job(previous_id)
        if job is None:
            raise self._expired(previous_id)
        history: list[dict[str, Any]] = orjson.loads(job.body).get("messages", [])
        renderer = await self.fold(stored)
        return history, output_items(renderer)

    # -- reading a stored response

    async def _meta(self, caller: Principal, response_id: str, param: str | None = None) -> RequestMeta:
        """The metadata of the caller's response; 404 (as vLLM words it) for an unknown id or another key's."""
        known = response_id.startswith("resp_") and keys.is_request_id(response_id)
        meta = await self.store.meta(response_id) if known else None
        if meta is None or meta.owner != caller.owner or meta.stream_format != "response":
            raise _not_found(response_id, param)
        return meta

    def _expired(self, response_id: str) -> APIError:
        return APIError(
            410,
            f"response {response_id} has expired (responses are kept {self.settings.retention_s:g}s after they end)",
            error_type="gone",
            code="response_expired",
        )

    async def stored(self, caller: Principal, response_id: str, param: str | None = None) -> Stored:
        """The caller's stored response; 404 for an unknown id, another key's, or one made with ``store:
        false``; 410 once its record expired."""
        meta = await self._meta(caller, response_id, param)
        job = await self.store.job(response_id)
        if job is None or not job.response:
            raise self._expired(response_id)
        request = ResponsesRequest.from_record(job.response)
        if not request.store:
            raise _not_found(response_id, param, " (it was created with store=false)")
        return Stored(meta, request)

    async def fold(self, stored: Stored, *, follow_s: float = 0.0) -> ResponseRenderer:
        """The response as its stored events make it; with ``follow_s``, waiting up to that long for it to
        end (following its events live)."""
        renderer = ResponseRenderer(stored.meta, stored.request)
        renderer.start()
        point = ResumePoint(stored.meta, 0, [])
        reader = self.sessions.reader
        try:
            if follow_s > 0:
                async with asyncio.timeout(follow_s):
                    async for batch in reader.batches(point, tick_s=min(follow_s, self.settings.heartbeat_s)):
                        self._feed(renderer, batch)
            else:
                cursor = 0
                while cursor < stored.meta.last_seq:
                    batch = await self.store.read_events(
                        stored.meta.request_id, cursor, self.settings.replay_batch_events
                    )
                    if not batch or batch[0][0] != cursor + 1:
                        raise EventsExpiredError(f"events after {cursor} are gone")
                    self._feed(renderer, batch)
                    cursor = batch[-1][0]
        except TimeoutError:
            pass  # followed the stream for follow_s: the object is answered as it stands now
        except EventsExpiredError:
            raise self._expired(stored.meta.request_id) from None
        return renderer

    @staticmethod
    def _feed(renderer: ResponseRenderer, batch: list[tuple[int, bytes]]) -> None:
        for _seq, payload in batch:
            renderer.feed(wire.decode(payload, wire.Event))

    async def retrieve(self, caller: Principal, response_id: str) -> Response:
        stored = await self.stored(caller, response_id)
        renderer = await self.fold(stored)
        return renderer.response(None if renderer.ended else STATUS_OF_STATE.get(stored.meta.state))

    async def input_items(
        self, caller: Principal, response_id: str, *, limit: int, order: str, after: str | None
    ) -> ResponseItemList:
        stored = await self.stored(caller, response_id)
        tag = response_id.removeprefix("resp_")
        items = [listed_item(item, f"in_{tag}_{index}") for index, item in enumerate(input_items(stored.request))]
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [item.id for item in items]
            if after not in ids:
                raise bad_request(f"no input item {after!r} in response {response_id}", param="after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return ResponseItemList(
            object="list",
            data=page,
            first_id=page[0].id if page else "",
            last_id=page[-1].id if page else "",
            has_more=len(items) > limit,
        )

    # -- changing a stored response

    async def cancel(self, caller: Principal, response_id: str) -> Response:
        """Stop a background response (at once when queued, within an engine step when running) and answer
        with it once stopped; one that already ended is answered as it is."""
        stored = await self.stored(caller, response_id)
        if not stored.request.background:
            raise bad_request("only a background response can be cancelled", param="response_id", code="not_background")
        code, _state = await self.store.cancel(response_id, caller.owner)
        if code == -1:  # deleted meanwhile
            raise _not_found(response_id, None)
        meta = await self._meta(caller, response_id)
        renderer = await self.fold(Stored(meta, stored.request), follow_s=CANCEL_WAIT_S)
        return renderer.response(None if renderer.ended else "in_progress")

    async def delete(self, caller: Principal, response_id: str) -> None:
        """Forget the caller's response (a running one stops: its worker's next write is refused)."""
        await self._meta(caller, response_id)
        if not await self.store.delete(response_id, caller.owner):
            raise _not_found(response_id, None)

    # -- streams

    async def resume(
        self, caller: Principal, response_id: str, starting_after: int | None
    ) -> tuple[ResponseRenderer, StreamSession]:
        """A stream of the caller's response from its first event (sequence numbers above ``starting_after``
        are sent): the renderer must see every stored event to number the ones after it."""
        stored = await self.stored(caller, response_id)
        session = await self.sessions.resume(caller, response_id, None, RESPONSES_SSE)
        return ResponseRenderer(session.point.meta, stored.request), session


async def response_frames(session: StreamSession, renderer: ResponseRenderer, after: int) -> AsyncIterator[bytes]:
    """The SSE body of a response stream: its events numbered above ``after``, as named SSE events.

    Queue notices, heartbeats, a handover (where a worker took over) and an interruption (the stream cannot
    go on; the response may: resume from the last sequence number) are SSE comments, which take no sequence
    number, so numbering depends on stored events alone. A resume is checked: once the events stored when
    it opened are rendered, ``after`` must be a number the stream had reached (else an ``error`` event)."""
    reached_at_open = session.point.meta.last_seq
    checked = False

    def bad_cursor() -> bytes | None:
        if renderer.next_sequence - 1 >= after:
            return None
        error = ResponseErrorEvent(
            type="error",
            sequence_number=renderer.next_sequence,
            code="invalid_starting_after",
            message=f"response {renderer.meta.request_id} has no event {after} "
            f"(its last is {renderer.next_sequence - 1})",
            param="starting_after",
        )
        return event_frame(error)

    first = renderer.frames(renderer.start(), after)
    if reached_at_open == 0:
        checked = True
        problem = bad_cursor()
        if problem is not None:
            yield problem
            return
    if first:
        yield first
    async with aclosing(session.items()) as items:
        async for item in items:
            if isinstance(item, Events):
                out: list[bytes] = []
                for seq, event in item.events:
                    if event.kind == "handover":
                        if renderer.next_sequence > after + 1:
                            out.append(comment_frame(handover.comment(seq, event)))
                        continue
                    frames = renderer.frames(renderer.feed(event), after)
                    if frames:
                        out.append(frames)
                if not checked and item.events[-1][0] >= reached_at_open:
                    checked = True
                    problem = bad_cursor()
                    if problem is not None:
                        yield problem
                        return
                if out:
                    yield b"".join(out)
            elif isinstance(item, Queued):
                yield comment_frame(item.notice())
            elif isinstance(item, Heartbeat):
                yield comment_frame("ping")
            else:
                yield comment_frame(f"interrupted {item.code}: {item.message}")


def final_body(renderer: ResponseRenderer, status: str | None = None) -> dict[str, Any]:
    return dump(renderer.response(status))
