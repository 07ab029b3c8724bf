"""Limits: what one request, one connection, one gateway and one API key may take.

- :func:`head_deadline_protocol`: uvicorn's HTTP protocol with a deadline on receiving a request's head (its
  request line and headers): a connection that has not sent a whole head ``header_timeout_s`` after it
  opened, or after its previous response, is closed (408 if it had begun one). uvicorn has no such timer,
  so a client sending a header a byte a second, or nothing at all, held its socket forever.
- :class:`BodySizeLimit`: the request body, enforced before anything parses it: 413 when Content-Length or
  the bytes actually received exceed it (chunked uploads included), 408 when it has not all arrived within
  ``body_timeout_s`` (a client that declares more than it sends). The body is read here, bounded by the
  limit, and handed on whole, so no parser ever sees more than the limit.
- :class:`ConnectionLimit`: HTTP requests and WebSockets one gateway process serves at once (open streams
  are requests that last); above it, 503 with ``Retry-After`` before any work. Probes and metrics are never
  refused, so a busy gateway is not mistaken for a dead one. Open sockets are counted too, whether or not
  they have sent a request yet: uvicorn's own ``limit_concurrency`` answers 503 on a socket beyond
  :func:`socket_limit` (the connection limit plus room for probes).
- :class:`KeyLimits`: per API key, across every gateway (the counters live in Redis): requests per minute
  (fixed one-minute windows, one atomic script per submission) and streams open at once (leases in a sorted
  set, renewed by the gateway holding each stream, so the place of a stream whose gateway died frees itself
  when its lease ends). Over either: 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

import redis.exceptions
from redis.commands.core import AsyncScript
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenspool.gateway.auth import Principal
from tokenspool.gateway.errors import APIError, rate_limited
from tokenspool.gateway.settings import GatewaySettings
from tokenspool.shared import keys, lua
from tokenspool.shared.aio import reraise_if_cancelling
from tokenspool.shared.redis_client import AsyncRedis

log = logging.getLogger("tokenspool.gateway.limits")

_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
PROBE_SOCKETS: Final = 32
"""Sockets allowed beyond ``max_connections``, so that probes and scrapes still reach a gateway whose
requests are at the limit."""
REQUEST_TIMEOUT_HEAD: Final = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


def socket_limit(max_connections: int) -> int:
    """Open sockets a gateway accepts (uvicorn's ``limit_concurrency``): every socket counts, one that has
    not finished sending its request as well as one holding a stream."""
    return max_connections + PROBE_SOCKETS


def head_deadline_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, as uvicorn itself picks, else h11) that closes a
    connection whose request head does not arrive within ``header_timeout_s``: from the moment it opened,
    or its previous response ended (keep-alive), to the end of its headers. A WebSocket, once upgraded, is
    another protocol's and not timed here."""
    base: Any
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class HeadDeadlineProtocol(base):  # type: ignore[misc]
        _head_timer: asyncio.TimerHandle | None = None
        _head_begun = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._await_head()

        def data_received(self, data: bytes) -> None:
            self._head_begun = self._head_timer is not None
            super().data_received(data)
            upgraded = self.transport.get_protocol() is not self
            if upgraded or (self.cycle is not None and not self.cycle.response_complete):
                self._stop_head_timer()  # the head is in (a new request cycle began), or a WebSocket took over

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            self._stop_head_timer()
            self._head_begun = False
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_too_slow)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self._head_begun:
                log.info("closing a connection whose request head took over %gs", header_timeout_s)
                self.transport.write(REQUEST_TIMEOUT_HEAD)
            self.transport.close()

    return HeadDeadlineProtocol


NEVER_REFUSED_PATHS: Final = frozenset({"/healthz", "/readyz", "/health", "/version", "/metrics"})
WINDOW_MS: Final = 60_000


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(413, f"request body is larger than {self.max_body_bytes} bytes", code="body_too_large")
        await error.response()(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _METHODS_WITH_BODY:
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                await self._refuse(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):  # a timer, not a task
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return  # the client left before sending its body
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        await self._refuse(scope, receive, send)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            reraise_if_cancelling()
            error = APIError(
                408,
                f"the request body did not arrive within {self.body_timeout_s:g}s",
                code="body_timeout",
                headers={"Connection": "close"},
            )
            await error.response()(scope, receive, send)
            return
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay_receive, send)


class ConnectionLimit:
    """At most ``max_connections`` HTTP requests and WebSockets in this process at once."""

    def __init__(self, app: ASGIApp, max_connections: int) -> None:
        self.app = app
        self.max_connections = max_connections
        self.open = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in NEVER_REFUSED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.open >= self.max_connections:
            error = APIError(
                503,
                f"this gateway serves {self.max_connections} connections already; retry later or elsewhere",
                error_type="server_error",
                code="too_many_connections",
                headers={"Retry-After": "1"},
            )
            if scope["type"] == "http" or "websocket.http.response" in scope.get("extensions", {}):
                await error.response()(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1013, "reason": "too many connections"})
            return
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1


@dataclass(eq=False, slots=True)
class StreamLease:
    """One open stream's place among its owner's; :meth:`KeyLimits.close_stream` gives it back."""

    owner: str
    stream_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    counted: bool = True
    """False when the owner has no stream limit: nothing is held in Redis."""


class KeyLimits:
    """Per-key limits shared by every gateway through Redis; one per gateway process."""

    def __init__(self, client: AsyncRedis, settings: GatewaySettings) -> None:
        self._redis = client
        self._settings = settings
        self._rate: AsyncScript = lua.register(client, "count_request")
        self._open_stream: AsyncScript = lua.register(client, "open_stream")
        self._refresh_s = settings.attach_refresh_s
        self._lease_ms = int(3 * settings.attach_refresh_s * 1000) + 1000
        self._held: dict[str, StreamLease] = {}
        self._released: list[StreamLease] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._maintain(), name="key-limits")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(redis.exceptions.RedisError):
            await self._flush(time.time())

    # -- requests per minute ------------------------------------------------------------------------------

    async def admit_request(self, caller: Principal) -> None:
        """Count a new request against its key's per-minute limit; 429 when the window is full."""
        limit = self._settings.key_requests_per_minute
        if not limit:
            return
        now = int(time.time() * 1000)
        window = now // WINDOW_MS
        counted = await self._rate(keys=[keys.rate_window_key(caller.owner, window)], args=[limit, WINDOW_MS + 1000])
        if not int(counted):
            retry_after = max(1, math.ceil(((window + 1) * WINDOW_MS - now) / 1000))
            raise rate_limited(
                f"this API key may submit {limit} requests per minute; retry in {retry_after}s",
                code="rate_limit_exceeded",
                retry_after_s=retry_after,
            )

    # -- open streams -------------------------------------------------------------------------------------

    async def open_stream(self, caller: Principal) -> StreamLease:
        """Take a place for a new stream of this key; 429 when it has ``key_max_streams`` open."""
        limit = self._settings.key_max_streams
        if not limit:
            return StreamLease(caller.owner, counted=False)
        lease = StreamLease(caller.owner)
        now = int(time.time() * 1000)
        taken = await self._open_stream(
            keys=[keys.open_streams_key(caller.owner)],
            args=[now, now + self._lease_ms, limit, lease.stream_id, self._lease_ms],
        )
        if not int(taken):
            raise rate_limited(
                f"this API key has {limit} streams open already; close one, or retry when one ends",
                code="too_many_streams",
            )
        self._held[lease.stream_id] = lease
        return lease

    def close_stream(self, lease: StreamLease) -> None:
        """Give a stream's place back (in Redis soon after, by the maintenance task; at worst its lease ends)."""
        if self._held.pop(lease.stream_id, None) is not None:
            self._released.append(lease)
            self._wake.set()

    async def _maintain(self) -> None:
        """Give back released places at once; renew the leases of open streams every refresh period."""
        last_renewal = time.monotonic()
        while True:
            try:  # not asyncio.wait_for: on Python 3.11 it loses a cancel that arrives as the wait ends
                async with asyncio.timeout(self._refresh_s):
                    await self._wake.wait()
            except TimeoutError:
                reraise_if_cancelling()
            self._wake.clear()
            renew = time.monotonic() - last_renewal >= self._refresh_s
            try:
                await self._flush(time.time(), renew=renew)
                if renew:
                    last_renewal = time.monotonic()
            except redis.exceptions.RedisError as exc:
                reraise_if_cancelling()
                log.warning("could not update open-stream leases (retrying): %s", exc)

    async def _flush(self, now_s: float, *, renew: bool = False) -> None:
        released, self._released = self._released, []
        pipe: Any = self._redis.pipeline(transaction=False)
        for lease in released:
            pipe.zrem(keys.open_streams_key(lease.owner), lease.stream_id)
        if renew:
            until = int(now_s * 1000) + self._lease_ms
            for lease in self._held.values():
                pipe.zadd(keys.open_streams_key(lease.owner), {lease.stream_id: until}, xx=True)
                pipe.pexpire(keys.open_streams_key(lease.owner), self._lease_ms)
        if len(pipe):
            try:
                await pipe.execute()
            except BaseException:
                self._released[:0] = released  # not given back yet: try again next round
                raise
