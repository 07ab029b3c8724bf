"""OpenAI-style errors: one exception type the services raise, one JSON body shape clients parse."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel
from starlette.responses import Response


class APIError(Exception):
    """An error with its HTTP status and OpenAI error type, raised by services, answered by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
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


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(message: str, *, code: str = "not_found") -> APIError:
    return APIError(404, message, error_type="not_found_error", code=code)


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
