"""OpenAI-style errors: one exception type the services raise, one JSON body shape clients parse, and the
errors every transport gives alike (a request that fails validation, an unreachable Redis)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

import orjson
import redis.exceptions
from pydantic import BaseModel
from starlette.responses import Response

from tokenspool.shared import wire

REDIS_UNREACHABLE: Final = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
"""What an unreachable Redis raises: a 503 (``redis_unavailable``) before a stream starts, an interruption
after it has."""


class APIError(Exception):
    """An error with its HTTP status and OpenAI error type, raised by services, answered by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # The message may quote what the client sent (a parameter's name), which may hold text with no
        # UTF-8 form (a lone surrogate): written as escapes, so that every answer can be encoded.
        message = printable(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param if param is None else printable(param)
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(
            orjson.dumps(self.body()), status_code=self.status, media_type="application/json", headers=self.headers
        )


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) written as ``\\udxxx`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid_text(param: str) -> APIError:
    """The answer to text no UTF-8 encoding exists for (a lone UTF-16 surrogate, which a JSON ``\\ud800``
    escape can carry), in any field: a 400 that names it, on every transport."""
    return APIError(
        400,
        f"invalid value for {param!r}: the text is not valid Unicode (it holds a lone UTF-16 surrogate)",
        param=param,
        code="invalid_text",
    )


ENGINE_REFUSALS: Final[Mapping[str, int]] = {
    "BadRequestError": 400,
    "NotFoundError": 404,
    "UnprocessableEntityError": 422,
}
"""Error types a vLLM worker stores when vLLM's own front end refuses a request (the types ``vllm serve``
answers with), and the status ``vllm serve`` gives each."""


def engine_refusal(event: wire.Event) -> APIError | None:
    """The HTTP error ``vllm serve`` would have answered, when a request's first stored event says the
    engine refused it (a ``wire.Event`` of kind ``error`` with one of :data:`ENGINE_REFUSALS`' types); the
    body is vLLM's (``code`` is the status, ``param`` the parameter vLLM named)."""
    status = ENGINE_REFUSALS.get(event.error_type) if event.kind == "error" else None
    if status is None:
        return None
    return APIError(status, event.message, error_type=event.error_type, param=event.param or None, code=status)


def no_tokens() -> APIError:
    """A chat request for no tokens (``max_tokens`` or ``max_completion_tokens`` 0): ``vllm serve`` passes it
    on to vLLM's ``SamplingParams``, which refuses it, and answers its ``VLLMValidationError`` as this (its
    message, type and integer code), on any engine and before anything is stored."""
    return APIError(
        400,
        "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        error_type="BadRequestError",
        param="max_tokens",
        code=400,
    )


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, *, code: str = "not_found") -> APIError:
    return APIError(404, message, error_type="not_found_error", code=code)


def rate_limited(message: str, *, code: str, retry_after_s: int | None = 1) -> APIError:
    """A 429 in OpenAI's shape: the caller may retry, after ``Retry-After`` seconds when one is given."""
    headers = {} if retry_after_s is None else {"Retry-After": str(retry_after_s)}
    return APIError(429, message, error_type="rate_limit_error", code=code, headers=headers)


def redis_unavailable() -> APIError:
    """The answer while Redis cannot be reached: retry later (on any transport)."""
    return APIError(
        503,
        "the request store (Redis) is unavailable; retry later",
        error_type="server_error",
        code="redis_unavailable",
        headers={"Retry-After": "1"},
    )


class InvalidFieldError(ValueError):
    """A check that spans fields (a model validator, whose errors pydantic locates nowhere) names the field
    the client must change, so the 400 names it too."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


_LOCATIONS: Final = frozenset({"body", "query", "header", "path"})
_FIELD_NAME: Final = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_NAMES: Final = frozenset({"str", "int", "float", "bool", "dict", "list", "bytes", "none"})
_KINDS_IN_WORDS: Final = {
    "str": "a string",
    "list[str]": "a list of strings",
    "list[TextPart]": "a list of text parts",
    "list[tagged-union[TextPart,MediaPart]]": "a list of content parts",
    "int": "an integer",
    "list[int]": "a list of integers",
    "list[constrained-int]": "a list of token ids",
    "list[list[constrained-int]]": "a list of lists of token ids",
}


def _location(error: Mapping[str, Any]) -> tuple[Any, ...]:
    """Where the error is, without the part of the HTTP request it was read from (body, query, header)."""
    loc = tuple(error.get("loc", ()))
    return loc[1:] if loc and loc[0] in _LOCATIONS else loc


def _is_union_member(part: Any) -> bool:
    """pydantic puts the union member it tried into an error's location (``str``, ``list[str]``,
    ``TextPart``, ``function-after[...]``); the client's fields are snake_case names and list indices."""
    return isinstance(part, str) and (part in _TYPE_NAMES or not _FIELD_NAME.fullmatch(part))


def _reported(errors: Sequence[Mapping[str, Any]]) -> tuple[Mapping[str, Any], str | None]:
    """The error to report, and for a union that no member matched even at its top, what it takes.

    The first error of a union value is its first member's (``prompt.str``: "should be a valid string" for a
    prompt sent as a list of lists); the member that took the value's kind says what is wrong inside it."""
    first = errors[0]
    loc = _location(first)
    at = next((i for i, part in enumerate(loc) if _is_union_member(part)), None)
    if at is None:
        return first, None
    members = [
        error
        for error in errors
        if len(other := _location(error)) > at and other[:at] == loc[:at] and _is_union_member(other[at])
    ]
    for member in sorted(members, key=lambda error: -len(_location(error))):
        if len(_location(member)) > at + 1 or not str(member.get("type", "")).endswith("_type"):
            return member, None  # this member took the value's kind: what is wrong is inside it
    kinds = dict.fromkeys(str(_location(error)[at]) for error in members)
    return first, " or ".join(_KINDS_IN_WORDS.get(kind, kind) for kind in kinds)


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The first validation problem of a request (pydantic's ``errors()``) as an OpenAI 400 that names the
    parameter as the client sent it (``prompt``, ``messages.0.content``, a query parameter's own name): the
    same codes and messages whether the request came as an HTTP body, a WebSocket message or a gRPC call."""
    if not errors:
        return APIError(400, "invalid request")
    first, expected = _reported(errors)
    loc = [str(part) for part in _location(first) if not _is_union_member(part)]
    cause = first.get("ctx", {}).get("error")
    param = cause.param if isinstance(cause, InvalidFieldError) else ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"unsupported parameter {param!r}", param=param, code="unsupported_parameter")
    if kind == "string_unicode":
        if param:
            return invalid_text(param)
        return APIError(
            400, "a parameter name is not valid Unicode (it holds a lone UTF-16 surrogate)", code="invalid_text"
        )
    if kind == "missing":
        if not loc:
            return APIError(400, "a JSON request body is required", code="missing_body")
        return APIError(400, f"missing required parameter {param!r}", param=param, code="missing_parameter")
    if param is None and kind in ("model_attributes_type", "model_type", "dict_type"):
        return APIError(400, "the request body must be a JSON object", code="invalid_body")
    detail = (
        f"expected {expected}" if expected else str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    )
    message = f"invalid value for {param!r}: {detail}" if param else f"invalid value: {detail}"
    return APIError(400, message, param=param, code="invalid_value")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None
    """A string for tokenspool's own errors; the status for those given as ``vllm serve`` gives them."""


class ErrorBody(BaseModel):
    """The body of every error answer (for the OpenAPI document, which the fuzz tests check answers against)."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "a bad parameter",
        401: "no valid API key (when the gateway has keys)",
        404: "unknown model, or unknown request (another key's request answers the same)",
        408: "the request body did not all arrive within body_timeout_s",
        409: "the request already ended, or was cancelled",
        410: "the events asked for have expired",
        413: "the body is too large",
        422: "an Idempotency-Key reused with another body",
        429: "the model's queue is full, or the key's per-minute or open-stream limit is reached (Retry-After)",
        503: "Redis is unreachable, or the gateway serves too many connections (Retry-After)",
    }.items()
}
"""The error answers of the API routes, as documented in the OpenAPI document."""
