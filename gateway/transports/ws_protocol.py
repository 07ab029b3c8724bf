"""The messages of the WebSocket transport: parsing what a client sends, building what it receives.

Parsing is as strict as the HTTP API and reports problems with the same OpenAI error codes (the request
fields are checked by the very models the HTTP routes use), so a client sees one set of errors whichever
transport it uses. The protocol itself is described in :mod:`tokenspool.gateway.transports.websocket`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

import orjson
from pydantic import ValidationError

from tokenspool.gateway.chunks import chat_logprobs, parsed_pieces, usage_body
from tokenspool.gateway.errors import APIError, bad_request, invalid_text, validation_error
from tokenspool.gateway.schemas import ChatCompletionRequest
from tokenspool.shared import keys, wire

Tag = str | int | None
"""A client's correlation tag (its message's ``"id"``), echoed on the answers to that message."""

MAX_TAG_CHARS: Final = 256
MAX_IDEMPOTENCY_KEY: Final = 255
_PLACEHOLDER_MODEL: Final = "-"
"""Stands in for a model the message left out while its other fields are validated; the session then
chooses the model (the only one served) or refuses the message."""

_SUBMIT_ONLY: Final = frozenset({"id", "prompt", "idempotency_key"})
_CANCEL_FIELDS: Final = frozenset({"cancel", "id"})
_RESUME_FIELDS: Final = frozenset({"resume", "last_event_id", "id"})


@dataclass(frozen=True, slots=True)
class Submit:
    """A new chat request."""

    tag: Tag
    body: ChatCompletionRequest
    model_given: bool
    idempotency_key: str | None


@dataclass(frozen=True, slots=True)
class Cancel:
    tag: Tag
    request_id: str


@dataclass(frozen=True, slots=True)
class Resume:
    tag: Tag
    request_id: str
    last_event_id: str | None


Command = Submit | Cancel | Resume


def decode(data: str | bytes | None, max_bytes: int) -> dict[str, Any]:
    """A client message as a JSON object; an APIError (``invalid_json``, ``message_too_large``) if not."""
    if data is None:
        raise bad_request("an empty WebSocket message is not a command", code="invalid_json")
    size = len(data) if isinstance(data, bytes) else len(data.encode())
    if size > max_bytes:
        raise APIError(413, f"message is larger than {max_bytes} bytes", code="message_too_large")
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:  # valid JSON orjson refuses: a lone surrogate escape ("\ud800"), which the submission's text
            # check then refuses naming its field, as over HTTP (whose parser is this one)
            value = json.loads(data)
        except ValueError:
            raise bad_request(f"the message is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(value, dict):
        raise bad_request("a message must be a JSON object", code="invalid_message")
    return value


def tag_of(message: dict[str, Any]) -> Tag:
    """The message's ``"id"`` (a string or an integer), or None when it has none."""
    tag = message.get("id")
    if tag is None:
        return None
    if isinstance(tag, bool) or not isinstance(tag, str | int):
        raise bad_request("'id' must be a string or an integer", param="id", code="invalid_value")
    if isinstance(tag, str) and wire.unencodable_text(tag) is not None:
        raise invalid_text("id")  # echoed in every answer: it must be text an answer can carry
    if isinstance(tag, str) and len(tag) > MAX_TAG_CHARS:
        raise bad_request(f"'id' must be at most {MAX_TAG_CHARS} characters", param="id", code="invalid_value")
    return tag


def named_request(message: dict[str, Any]) -> str | None:
    """The request a cancel or resume names (for the ``request_id`` of an error about it)."""
    for field in ("cancel", "resume"):
        value = message.get(field)
        if isinstance(value, str) and wire.unencodable_text(value) is None:
            return value
    return None


def parse(message: dict[str, Any]) -> Command:
    """The command a decoded message carries; an APIError naming the problem if it carries none."""
    tag = tag_of(message)
    bad = wire.unencodable_text(message)  # named as this message names it ('prompt', not the chat message)
    if bad is not None:
        raise invalid_text(bad)
    if "cancel" in message:
        _only(message, _CANCEL_FIELDS)
        return Cancel(tag, _string(message, "cancel"))
    if "resume" in message:
        _only(message, _RESUME_FIELDS)
        last = message.get("last_event_id")
        if last is not None and not isinstance(last, str):
            raise bad_request("'last_event_id' must be a string or null", param="last_event_id", code="invalid_value")
        return Resume(tag, _string(message, "resume"), last or None)
    if "prompt" in message or "messages" in message:
        return _submit(message, tag)
    raise bad_request(
        "a message must carry 'prompt' or 'messages' (a request), 'cancel' or 'resume'", code="unknown_message"
    )


def _only(message: dict[str, Any], allowed: frozenset[str]) -> None:
    extra = sorted(set(message) - allowed)
    if extra:
        raise bad_request(f"unsupported parameter {extra[0]!r}", param=extra[0], code="unsupported_parameter")


def _string(message: dict[str, Any], field: str) -> str:
    value = message[field]
    if not isinstance(value, str) or not value:
        raise bad_request(f"{field!r} must be a request id (a string)", param=field, code="invalid_value")
    return value


def _submit(message: dict[str, Any], tag: Tag) -> Submit:
    if "prompt" in message and "messages" in message:
        raise bad_request("give either 'prompt' or 'messages', not both", param="prompt", code="invalid_value")
    params = {name: value for name, value in message.items() if name not in _SUBMIT_ONLY}
    if "prompt" in message:
        prompt = message["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise bad_request("'prompt' must be a non-empty string", param="prompt", code="invalid_value")
        params["messages"] = [{"role": "user", "content": prompt}]
    if params.get("stream", True) is not True:
        raise bad_request(
            "a WebSocket request always streams: leave 'stream' out or set it to true",
            param="stream",
            code="invalid_value",
        )
    params["stream"] = True
    key = message.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_IDEMPOTENCY_KEY):
        raise bad_request(
            f"'idempotency_key' must be a string of 1 to {MAX_IDEMPOTENCY_KEY} characters",
            param="idempotency_key",
            code="invalid_value",
        )
    model_given = "model" in params
    if not model_given:
        params["model"] = _PLACEHOLDER_MODEL
    try:
        body = ChatCompletionRequest.model_validate(params)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    return Submit(tag, body, model_given, key)


# -- server -> client ---------------------------------------------------------------------------------


def encode(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


def answer(kind: str, request_id: str, tag: Tag, **fields: Any) -> dict[str, Any]:
    """An acknowledgement of a command: ``accepted``, ``resumed``, ``cancel``."""
    return {"type": kind, "request_id": request_id, "id": tag, **fields}


def command_error(error: APIError, *, request_id: str | None, tag: Tag) -> dict[str, Any]:
    """A refused message: the OpenAI error object and the HTTP status the same mistake gets over HTTP."""
    return {"type": "error", "request_id": request_id, "id": tag, "status": error.status, **error.body()}


def stream_error(request_id: str, tag: Tag, error_type: str, message: str) -> dict[str, Any]:
    """A stream that failed; a ``done`` follows it."""
    error = {"message": message, "type": error_type, "param": None, "code": error_type}
    return {"type": "error", "request_id": request_id, "id": tag, "error": error}


def token(request_id: str, seq: int, event: wire.Event) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "token",
        "request_id": request_id,
        "event_id": keys.event_id(request_id, seq),
        "content": event.text,
    }
    if event.logprobs:
        out["logprobs"] = chat_logprobs([event])
    # What vLLM's parsers split off, only when set (a plain token's message is unchanged).
    if event.index:
        out["index"] = event.index
    out.update(parsed_pieces(event))
    return out


def handover(request_id: str, seq: int, event: wire.Event) -> dict[str, Any]:
    """Where another worker continued the request (informational: the tokens go on without a gap)."""
    return {
        "type": "handover",
        "request_id": request_id,
        "event_id": keys.event_id(request_id, seq),
        "message": event.message,
    }


def queued(request_id: str, waiting: int) -> dict[str, Any]:
    """Sent now and then while a request waits for a worker: how many requests of its model wait."""
    return {"type": "queued", "request_id": request_id, "waiting": waiting}


def done(
    request_id: str,
    tag: Tag,
    *,
    seq: int | None,
    state: str,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The last message of a stream on this socket."""
    return {
        "type": "done",
        "request_id": request_id,
        "id": tag,
        "event_id": keys.event_id(request_id, seq) if seq is not None else None,
        "state": state,
        "finish_reason": finish_reason,
        "usage": usage,
    }


def end_of(request_id: str, tag: Tag, seq: int, event: wire.Event) -> dict[str, Any]:
    """The ``done`` of a request that finished normally."""
    usage = usage_body(event.prompt_tokens, event.completion_tokens)
    return done(request_id, tag, seq=seq, state="done", finish_reason=event.finish_reason, usage=usage)
