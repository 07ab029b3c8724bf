"""The gateway application: resources are built in the lifespan and handed to the routes."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from tokenspool.gateway import page
from tokenspool.gateway.attachments import Attachments
from tokenspool.gateway.auth import KeyRing
from tokenspool.gateway.catalog import ModelCatalog
from tokenspool.gateway.errors import APIError, redis_unavailable, validation_error
from tokenspool.gateway.limits import BodySizeLimit, ConnectionLimit, KeyLimits
from tokenspool.gateway.metrics import CountResponses, GatewayMetrics
from tokenspool.gateway.reader import EventReader
from tokenspool.gateway.relay import Relay
from tokenspool.gateway.services import Services
from tokenspool.gateway.session import StreamSessions
from tokenspool.gateway.settings import GatewaySettings, is_loopback
from tokenspool.gateway.submission import SubmissionService
from tokenspool.gateway.transports import http, responses_http, websocket
from tokenspool.shared.redis_client import NodeConnections, RedisTarget, connect, connection_name, redact
from tokenspool.shared.store import RequestStore

if TYPE_CHECKING:
    from tokenspool.gateway.transports.grpc import GrpcServer

log = logging.getLogger("tokenspool.gateway")


CORS_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key")
CORS_EXPOSED = ("X-Request-Id", "Retry-After")


def announce_access(settings: GatewaySettings, key_ring: KeyRing) -> None:
    """Say at start who may use this gateway, loudest when anyone may."""
    if not key_ring.open:
        log.info("API keys required: %d key(s) configured", len(key_ring))
    elif is_loopback(settings.host):
        log.warning(
            "no API key is configured: this gateway serves without authentication, to anyone on this machine "
            "(set TOKENSPOOL_API_KEYS or TOKENSPOOL_API_KEYS_FILE to require keys)"
        )
    else:
        log.warning(
            "no API key is configured and TOKENSPOOL_ALLOW_OPEN is set: this gateway serves WITHOUT "
            "authentication to anyone who can reach %s, and every client can read every stream",
            settings.host,
        )


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway app. Raises SettingsError when the API key file cannot be used (the gateway does not start)."""
    assert settings.redis_url is not None, "the CLI resolves the Redis URL before building the app"
    redis_url = settings.redis_url
    target = RedisTarget.of(settings)
    metrics = GatewayMetrics(settings.metrics_multiproc_dir)
    key_ring = KeyRing.load(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        name = connection_name("tokenspool", "gateway", str(os.getpid()))
        client = connect(target, name=f"{name}:commands", max_connections=settings.redis_pool_connections)
        await client.ping()
        store = RequestStore(client, settings)
        relay = Relay(
            NodeConnections(target, client, name=name, socket_timeout_s=settings.reader_block_ms / 1000 + 10),
            block_ms=settings.reader_block_ms,
            count=settings.replay_batch_events,
            buffer_events=settings.client_buffer_events,
        )
        relay.start()
        attachments = Attachments(store, refresh_s=settings.attach_refresh_s, grace_s=settings.disconnect_grace_s)
        attachments.start()
        catalog = ModelCatalog(client, worker_ttl_s=settings.worker_ttl_s, model_grace_s=settings.model_grace_s)
        limits = KeyLimits(client, settings)
        limits.start()
        submissions = SubmissionService(store, catalog, limits, settings)
        services = Services(
            settings=settings,
            store=store,
            catalog=catalog,
            submissions=submissions,
            sessions=StreamSessions(
                reader=EventReader(store, relay, settings, metrics),
                submissions=submissions,
                catalog=catalog,
                limits=limits,
                attachments=attachments,
                store=store,
                settings=settings,
                metrics=metrics,
            ),
            keys=key_ring,
            limits=limits,
            metrics=metrics,
        )
        app.state.services = services
        grpc_server: GrpcServer | None = None
        try:
            if settings.grpc_port is not None:
                # Imported here: a gateway without a gRPC port never loads grpc.
                from tokenspool.gateway.transports.grpc import GrpcServer

                grpc_server = GrpcServer(services, settings)
                await grpc_server.start()
            announce_access(settings, key_ring)
            log.info("gateway ready, Redis at %s", redact(redis_url))
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop()
            await limits.close()
            await attachments.close()
            await relay.close()
            await client.aclose()
            metrics.process_exited()

    app = FastAPI(title="tokenspool gateway", version="0.1.0", lifespan=lifespan)
    app.include_router(http.router)
    app.include_router(responses_http.router)
    app.include_router(websocket.router)
    app.include_router(page.router)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    def answer(error: APIError) -> Response:
        metrics.count_error(error)
        return error.response()

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> Response:
        return answer(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> Response:
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        headers = dict(exc.headers) if exc.headers else None
        return answer(APIError(exc.status_code, str(exc.detail), error_type=error_type, headers=headers))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> Response:
        return answer(validation_error(exc.errors()))

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    @app.exception_handler(redis.exceptions.ClusterDownError)  # a cluster with uncovered slots
    @app.exception_handler(redis.exceptions.RedisClusterException)  # no cluster node reachable
    async def redis_down(_request: Request, exc: Exception) -> Response:
        log.warning("Redis unavailable: %s", exc)
        return answer(redis_unavailable())

    # Outermost last: CORS answers preflights and decorates every answer (refusals included); the
    # connection limit refuses before any work; the body limit before any parsing.
    app.add_middleware(BodySizeLimit, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s)
    app.add_middleware(CountResponses, metrics=metrics)
    app.add_middleware(ConnectionLimit, max_connections=settings.max_connections)
    if settings.cors_origin_list():
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list(),
            allow_methods=("GET", "POST", "DELETE"),
            allow_headers=CORS_HEADERS,
            expose_headers=CORS_EXPOSED,
            allow_credentials=False,
        )
    return app
