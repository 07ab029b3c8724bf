"""OpenAI-style errors: one exception type the services raise, one JSON body shape clients parse, and the
errors every transport gives alike (a request that fails validation, an unreachable Redis)."""

from __future__ import annotations

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
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(
            orjson.dumps(self.body()), status_code=self.status, media_type="application/json", headers=self.headers
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
    body is vLLM's (``code`` is the status)."""
    status = ENGINE_REFUSALS.get(event.error_type) if event.kind == "error" else None
    if status is None:
        return None
    return APIError(status, event.message, error_type=event.error_type, code=status)


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


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The first validation problem of a request (pydantic's ``errors()``) as an OpenAI 400 that names the
    parameter: the same codes and messages whether the request came as an HTTP body, a WebSocket message or
    a gRPC call."""
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"unsupported parameter {param!r}", param=param, code="unsupported_parameter")
    if kind == "missing":
        if not loc:
            return APIError(400, "a JSON request body is required", code="missing_body")
        return APIError(400, f"missing required parameter {param!r}", param=param, code="missing_parameter")
    detail = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    message = f"invalid value for {param!r}: {detail}" if param else f"invalid value: {detail}"
    return APIError(400, message, param=param, code="invalid_value")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """The body of every error answer (for the OpenAPI document, which the fuzz tests check answers against)."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "a bad parameter",
        401: "no valid API key (when the gateway has keys)",
        404: "unknown model, or unknown request (another key's request answers the same)",
        409: "the request already ended, or was cancelled",
        410: "the events asked for have expired",
        413: "the body is too large",
        422: "an Idempotency-Key reused with another body",
        429: "the model's queue is full, or the key's per-minute or open-stream limit is reached (Retry-After)",
        503: "Redis is unreachable, or the gateway serves too many connections (Retry-After)",
    }.items()
}
"""The error answers of the API routes, as documented in the OpenAPI document."""
