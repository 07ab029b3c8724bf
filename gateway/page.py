"""The browser chat page (``/``): one HTML page and its script and style, served from the package.

The page is plain HTML and JavaScript with no build step and no outside assets, so any gateway can serve it
and it works where nothing but the gateway is reachable. It uses only the public HTTP API (``/v1/models``,
``POST /v1/chat/completions``, ``GET /v1/requests/{id}/events`` to resume, ``DELETE /v1/requests/{id}``).
The files are read when asked for, so an edited page shows on reload and importing this module reads nothing.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from fastapi import APIRouter
from starlette.responses import Response

from tokenspool.gateway.errors import not_found

STATIC_DIR: Final = "static"
ASSETS: Final[dict[str, str]] = {
    "index.html": "text/html; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
}
"""The only files served: a fixed list, so no request path ever reaches the filesystem."""

# The page loads nothing from elsewhere and runs no inline script; the policy makes that a promise.
PAGE_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise not_found(f"no page asset {name!r}")
    body = resources.files("gateway").joinpath(STATIC_DIR, name).read_bytes()
    return Response(body, media_type=media_type, headers=PAGE_HEADERS)


@router.get("/")
def chat_page() -> Response:
    # A sync route: the (small) file read runs in the thread pool, off the event loop.
    return _asset("index.html")


@router.get("/static/{name}")
def page_asset(name: str) -> Response:
    return _asset(name)
