"""What every transport uses, built once in the app's lifespan, and the dependencies that hand it to the
HTTP routes (the services themselves and the caller's API key)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Final

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tokenspool.gateway.auth import KeyRing, Principal
from tokenspool.gateway.catalog import ModelCatalog
from tokenspool.gateway.limits import KeyLimits
from tokenspool.gateway.metrics import GatewayMetrics
from tokenspool.gateway.session import StreamSessions
from tokenspool.gateway.settings import GatewaySettings
from tokenspool.gateway.submission import SubmissionService
from tokenspool.shared.store import RequestStore


@dataclass(frozen=True, slots=True)
class Services:
    """What the transports use; built once in the app's lifespan."""

    settings: GatewaySettings
    store: RequestStore
    catalog: ModelCatalog
    submissions: SubmissionService
    sessions: StreamSessions
    keys: KeyRing
    limits: KeyLimits
    metrics: GatewayMetrics


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


_BEARER = HTTPBearer(auto_error=False, description="an API key, when the gateway has keys")
"""Declares the scheme in the OpenAPI document; the header itself is read by :func:`caller`."""


BEARER_SCHEME: Final = "HTTPBearer"
"""The security scheme's name in the OpenAPI document (what FastAPI names :data:`_BEARER`)."""


async def caller_of(request: Request) -> Principal:
    """The API key a request carries (``Authorization: Bearer``); 401 without a valid one when keys are set.

    ``async`` although it awaits nothing: FastAPI runs a plain ``def`` dependency in a worker thread, a
    thread hop on every request's path to its first token."""
    return services(request).keys.from_authorization(request.headers.get("authorization"))


async def caller(
    request: Request, _documented: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
) -> Principal:
    """:func:`caller_of`, with the HTTPBearer dependency that declares the scheme in the OpenAPI document."""
    return await caller_of(request)


Caller = Annotated[Principal, Depends(caller)]
BareCaller = Annotated[Principal, Depends(caller_of)]
"""The same caller without the HTTPBearer sub-dependency, for the generation routes, which declare the
scheme in their ``openapi_extra``: a dependency solved before the body is validated (FastAPI only parses its
JSON first), so a request without a valid key is refused (401) whatever its body says, as with :data:`Caller`."""
