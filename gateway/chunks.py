"""Rendering stored events as what clients read: OpenAI chunk objects, the simple GET form, final JSON.

Rendering depends only on the stored event and on the request's metadata (id, model, created, format,
include_usage, continuous_usage), never on the connection: a replay therefore carries, byte for byte, the
frames the live stream carried.
"""

from __future__ import annotations

from typing import Any

import orjson

from tokenspool.gateway.sse import DONE_FRAME, comment_frame, data_frame, event_frame
from tokenspool.shared import handover, keys, wire
from tokenspool.shared.store import RequestMeta


def usage_body(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage; with ``reasoning_tokens`` (a worker whose vLLM has a reasoning parser), its
    ``completion_tokens_details`` as vLLM reports them."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def chat_logprobs(events: list[wire.Event]) -> dict[str, Any] | None:
    """OpenAI chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    entries = [lp for event in events for lp in event.logprobs]
    if not entries:
        return None
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [{"token": t, "logprob": p, "bytes": list(t.encode())} for t, p in lp.top],
            }
            for lp in entries
        ]
    }


def completion_logprobs(events: list[wire.Event]) -> dict[str, Any] | None:
    """OpenAI completions ``logprobs``: parallel lists of tokens, their logprobs, alternatives and offsets."""
    if not any(event.logprobs for event in events):
        return None
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for event in events:
        offset = event.text_offset
        for lp in event.logprobs:
            tokens.append(lp.token)
            token_logprobs.append(lp.logprob)
            top_logprobs.append(None if lp.logprob is None else dict(lp.top))
            offsets.append(offset)
            offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def is_plain(event: wire.Event) -> bool:
    """A text delta of the first choice without logprobs, reasoning or tool calls: the common case."""
    return not (event.logprobs or event.index or event.reasoning or event.tool_calls)


def parsed_pieces(event: wire.Event) -> dict[str, Any]:
    """What vLLM's parsers split off a delta, only when set: reasoning text, and the tool-call pieces (stored
    rendered, embedded as they are). Every transport that carries them carries them in this shape."""
    pieces: dict[str, Any] = {}
    if event.reasoning:
        pieces["reasoning"] = event.reasoning
    if event.tool_calls:
        pieces["tool_calls"] = orjson.Fragment(event.tool_calls.encode())
    return pieces


def chat_delta(event: wire.Event) -> dict[str, Any]:
    """A chat chunk's ``delta``: content (unless the delta carries only parsed pieces), then
    :func:`parsed_pieces`. The role is not here: a chat stream opens with vLLM's role-only chunks."""
    delta: dict[str, Any] = {}
    if event.text or not (event.reasoning or event.tool_calls):
        delta["content"] = event.text
    delta.update(parsed_pieces(event))
    return delta


def merged_tool_calls(events: list[wire.Event]) -> list[dict[str, Any]]:
    """The tool calls of one choice, from its streamed pieces: the first piece of each call carries its id,
    type and name, the later ones more of its arguments."""
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        if not event.tool_calls:
            continue
        for piece in orjson.loads(event.tool_calls):
            call = calls.setdefault(
                piece.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            if piece.get("id"):
                call["id"] = piece["id"]
            function = piece.get("function") or {}
            if function.get("name"):
                call["function"]["name"] = function["name"]
            call["function"]["arguments"] += function.get("arguments") or ""
    return [calls[index] for index in sorted(calls)]


def error_body(error_type: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": error_type}}


class ChunkRenderer:
    """Turns (seq, stored payload) into SSE frames for one request: with ``id:`` lines (``event_ids``, for
    clients that resume), or exactly vLLM's frames (ARCHITECTURE.md, "Where event ids go")."""

    def __init__(self, meta: RequestMeta, *, event_ids: bool = True) -> None:
        self.meta = meta
        self.event_ids = event_ids
        self._unshown_end: int | None = None
        """The sequence number of a terminal event rendered without a frame of its own."""
        self.deltas_rendered = 0
        self.handovers_rendered = 0
        self._base: dict[str, Any] = {"id": meta.request_id, "created": meta.created_s, "model": meta.model}
        # Most events are a plain chat delta (no logprobs, no finish): its JSON differs from the next only
        # in the text, so it is the same prefix and suffix around the encoded text. Built once here, it is
        # byte for byte what ``orjson.dumps`` of the full chunk gives (a unit test checks).
        self._plain_delta: tuple[bytes, bytes] | None = None
        self._role_chunks: list[bytes] = []
        self._role_tail = b"}"
        """The role chunks' JSON up to their usage (see ``_role_frames``)."""
        self._role_frames = b""
        """What a chat stream opens with, as ``vllm serve`` opens it: one role-only chunk per choice
        (``{"role": "assistant", "content": ""}``, in the request's ``role``), sent before the first event's
        frame and without an id of its own (a client that saw only it resumes from the start, which sends it
        again)."""
        self._roles_due: bool | None = None
        """Whether the role chunks are still to be sent: decided by the first event rendered."""
        self._continuous_usage = meta.continuous_usage and meta.stream_format in ("chat", "completion")
        """Every chunk carries the usage so far, from its event (``stream_options.continuous_usage_stats``):
        the role chunks the prompt's tokens and none generated, a delta its choice's tokens so far (the
        worker stores both on the deltas of such a request, and with a reasoning parser the choice's reasoning
        tokens so far, its ``completion_tokens_details``), as ``vllm serve`` sends them."""
        if meta.stream_format == "chat":
            head = orjson.dumps({**self._base, "object": "chat.completion.chunk"})[:-1]
            # With continuous usage, the usage and the closing brace follow per event (``_usage_tail``).
            tail = b"" if self._continuous_usage else b',"usage":null}' if meta.include_usage else b"}"
            self._plain_delta = (
                head + b',"choices":[{"index":0,"delta":{"content":',
                b'},"logprobs":null,"finish_reason":null}]' + tail,
            )
            self._role_chunks = [
                head
                + b',"choices":[{"index":%d,"delta":{"role":%b,"content":""},' % (index, orjson.dumps(meta.role))
                + b'"logprobs":null,"finish_reason":null}]'
                for index in range(meta.choices)
            ]
            self._role_tail = tail
            self._role_frames = b"".join(data_frame(chunk + tail) for chunk in self._role_chunks)
            if meta.token_ids:
                self._plain_delta = None  # every delta chunk carries its token ids

    def frames(self, items: list[tuple[int, bytes]]) -> bytes:
        """The SSE frames of stored (seq, payload) pairs."""
        return self.render([(seq, wire.decode(payload, wire.Event)) for seq, payload in items])

    def render(self, items: list[tuple[int, wire.Event]]) -> bytes:
        """The SSE frames of decoded (seq, event) pairs (a stream session decodes each event once)."""
        out = []
        for seq, event in items:
            if self._roles_due is None:
                self._roles_due = seq == 1  # a stream from its start (a resumed one had the role chunks)
            if event.kind == "handover":
                self.handovers_rendered += 1
                out.append(comment_frame(handover.comment(seq, event)))
                continue
            if event.kind == "delta":
                self.deltas_rendered += 1
            data = self.data(seq, event)
            if data is not None:
                if self._roles_due:
                    self._roles_due = False
                    if event.kind != "error":  # vLLM sends none before a refusal
                        out.append(self._opening(event))
                out.append(event_frame(self._event_id(seq), data))
            elif event.terminal:
                self._unshown_end = seq
        return b"".join(out)

    def _opening(self, event: wire.Event) -> bytes:
        """The role chunks, before the first event's frame (with continuous usage, the prompt's tokens are
        that event's: every delta and the end event of such a request carry them; with token ids, the
        prompt's ids are too, stored on each choice's first delta)."""
        if not (self._continuous_usage or self.meta.token_ids):
            return self._role_frames
        ids = b',"prompt_token_ids":' + orjson.dumps(event.prompt_token_ids) if self.meta.token_ids else b""
        tail = self._role_tail
        if self._continuous_usage:  # none generated yet; with a reasoning parser (the event's count), no reasoning
            tail = self._usage_tail(event.prompt_tokens, 0, None if event.reasoning_tokens is None else 0)
        return b"".join(data_frame(chunk + ids + tail) for chunk in self._role_chunks)

    @staticmethod
    def _usage_tail(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None) -> bytes:
        return b',"usage":' + orjson.dumps(usage_body(prompt_tokens, completion_tokens, reasoning_tokens)) + b"}"

    def done_frame(self) -> bytes:
        """``[DONE]``, after the terminal event was rendered. With ids, it carries the terminal event's id when
        that event had no frame of its own (a chat or completion stream without usage), so that the last id a
        client holds is always the request's last event: a reconnect from it is answered 204."""
        if self._unshown_end is None:
            return DONE_FRAME
        return event_frame(self._event_id(self._unshown_end), b"[DONE]")

    def _event_id(self, seq: int) -> str | None:
        return keys.event_id(self.meta.request_id, seq) if self.event_ids else None

    def data(self, seq: int, event: wire.Event) -> bytes | None:
        """The ``data:`` JSON of one event, or None for an event this format does not show."""
        if event.kind == "handover":
            return None
        if event.kind == "error":
            body = error_body(event.error_type, event.message, event.param or None)
            if self.meta.stream_format == "simple":
                body["done"] = True
            return orjson.dumps(body)
        fmt = self.meta.stream_format
        if fmt == "simple":
            if event.kind == "end":
                return orjson.dumps({"token": "", "done": True, "finish_reason": event.finish_reason})
            return orjson.dumps({"token": event.text, "done": False})
        if event.kind == "end":
            if not self.meta.include_usage:
                return None
            usage = usage_body(event.prompt_tokens, event.completion_tokens, event.reasoning_tokens)
            chunk = {**self._base, "object": self._object(), "choices": [], "usage": usage}
            return orjson.dumps(chunk)
        if fmt == "chat":
            plain = self._plain_delta
            if plain is not None and is_plain(event) and event.finish_reason is None:
                if self._continuous_usage:
                    return (
                        plain[0]
                        + orjson.dumps(event.text)
                        + plain[1]
                        + self._usage_tail(event.prompt_tokens, event.completion_tokens, event.reasoning_tokens)
                    )
                return plain[0] + orjson.dumps(event.text) + plain[1]
            choice: dict[str, Any] = {
                "index": event.index,
                "delta": chat_delta(event),
                "logprobs": chat_logprobs([event]),
                "finish_reason": event.finish_reason,
            }
            if self.meta.token_ids:
                choice["token_ids"] = event.token_ids
        else:
            logprobs = completion_logprobs([event])
            choice = {
                "index": event.index,
                "text": event.text,
                "logprobs": logprobs,
                "finish_reason": event.finish_reason,
            }
            if event.prompt_token_ids:  # asked for, or an echoed prompt's (vLLM's stream names them then too)
                choice["prompt_token_ids"] = event.prompt_token_ids
            if self.meta.token_ids:
                choice["token_ids"] = event.token_ids
        chunk = {**self._base, "object": self._object(), "choices": [choice]}
        if self._continuous_usage:
            chunk["usage"] = usage_body(event.prompt_tokens, event.completion_tokens, event.reasoning_tokens)
        elif self.meta.include_usage:
            chunk["usage"] = None
        return orjson.dumps(chunk)

    def _object(self) -> str:
        return "chat.completion.chunk" if self.meta.stream_format == "chat" else "text_completion"


def completion_body(meta: RequestMeta, deltas: list[wire.Event], end: wire.Event) -> dict[str, Any]:
    """The non-streaming OpenAI response of a finished request."""
    usage = usage_body(end.prompt_tokens, end.completion_tokens, end.reasoning_tokens)
    base = {"id": meta.request_id, "created": meta.created_s, "model": meta.model, "usage": usage}
    by_choice: dict[int, list[wire.Event]] = {}
    for event in deltas:
        by_choice.setdefault(event.index, []).append(event)
    choices = [_final_choice(meta, index, by_choice[index], end) for index in sorted(by_choice)] or [
        _final_choice(meta, 0, [], end)
    ]
    if meta.token_ids and meta.kind == "chat":
        base["prompt_token_ids"] = _prompt_token_ids(deltas)
    return {**base, "object": "chat.completion" if meta.kind == "chat" else "text_completion", "choices": choices}


def _prompt_token_ids(events: list[wire.Event]) -> list[int]:
    """The prompt's token ids, as the first delta of a request that asked for token ids stored them."""
    return next((list(event.prompt_token_ids) for event in events if event.prompt_token_ids), [])


def _with_token_ids(meta: RequestMeta, choice: dict[str, Any], events: list[wire.Event]) -> dict[str, Any]:
    """A final choice with its token ids (a completion's with its prompt's too), when the request asked."""
    if meta.token_ids:
        if meta.kind != "chat":
            choice["prompt_token_ids"] = _prompt_token_ids(events)
        choice["token_ids"] = [token for event in events for token in event.token_ids]
    return choice


def _final_choice(meta: RequestMeta, index: int, events: list[wire.Event], end: wire.Event) -> dict[str, Any]:
    text = "".join(event.text for event in events)
    finish_reason = next((e.finish_reason for e in reversed(events) if e.finish_reason), end.finish_reason)
    if meta.kind != "chat":
        choice = {"index": index, "text": text, "logprobs": completion_logprobs(events), "finish_reason": finish_reason}
        return _with_token_ids(meta, choice, events)
    message: dict[str, Any] = {"role": meta.role, "content": text}
    answer = next((orjson.loads(event.answer) for event in reversed(events) if event.answer), None)
    if answer is not None:  # vLLM's parsers read the output: their whole-output answer, as vLLM gives it
        finish_reason = answer.pop("finish_reason")
        message["content"] = answer.pop("content", None)
        message.update((key, value) for key, value in answer.items() if value not in (None, []))
    else:
        reasoning = "".join(event.reasoning for event in events)
        if reasoning:
            message["reasoning"] = reasoning
        tool_calls = merged_tool_calls(events)
        if tool_calls:
            message["tool_calls"] = tool_calls
    choice = {"index": index, "message": message, "logprobs": chat_logprobs(events), "finish_reason": finish_reason}
    return _with_token_ids(meta, choice, events)
