"""Gateway metrics (prometheus-client), in a registry of this app's own: no process globals.

Buckets fit LLM latencies: time to first token from 5 ms to a minute, time per output token from 1 ms
to 2 s. No label ever carries a request id.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenspool.gateway.errors import APIError

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2)
BACKLOG_BUCKETS = (0, 1, 5, 10, 50, 100, 500, 1000, 5000, 10000)
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


def use_multiprocess_mode(directory: str) -> None:
    """Keep this process's metric values in ``directory``, beside its sibling gateways'.

    prometheus-client chooses where values live from ``PROMETHEUS_MULTIPROC_DIR`` when it is first imported;
    setting it here and choosing again makes the choice independent of import order. Called once, at
    process start, before any metric exists.
    """
    Path(directory).mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.get_value_class()


class GatewayMetrics:
    """All the gateway's metrics. With ``multiproc_dir`` set (several gateway processes sharing one port),
    a scrape of any one of them merges the values of all, so the kernel's choice of process does not matter.
    """

    def __init__(self, multiproc_dir: str = "") -> None:
        self.multiproc_dir = multiproc_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.responses = Counter(
            "tokenspool_gateway_responses", "HTTP responses by route and status code", ["route", "status"], registry=r
        )
        self.streams_active = Gauge(
            "tokenspool_gateway_streams_active",
            "Streams open now (SSE, WebSocket, gRPC)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.ttft = Histogram(
            "tokenspool_gateway_time_to_first_token_seconds",
            "From submission to the first token written to the client (new streams only)",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.ttft_after_resume = Histogram(
            "tokenspool_gateway_resume_time_to_first_event_seconds",
            "From a resume request to the first event written to the client",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "tokenspool_gateway_time_per_output_token_seconds",
            "Mean time between tokens of a stream, observed when it ends",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.stream_duration = Histogram(
            "tokenspool_gateway_stream_duration_seconds",
            "How long streams stay open (SSE, WebSocket, gRPC)",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.streams_ended = Counter(
            "tokenspool_gateway_streams_ended",
            "Streams (SSE, WebSocket, gRPC) by how they ended (done, disconnected, error)",
            ["how"],
            registry=r,
        )
        self.resumes = Counter("tokenspool_gateway_resumes", "Streams opened from a Last-Event-ID", registry=r)
        self.replayed_events = Counter(
            "tokenspool_gateway_replayed_events", "Events sent from Redis range reads (replay, catch-up)", registry=r
        )
        self.events_sent = Counter("tokenspool_gateway_events_sent", "Events written to clients", registry=r)
        self.resume_backlog = Histogram(
            "tokenspool_gateway_resume_backlog_events",
            "How far behind the stored tail a resuming client was: events it had to replay",
            buckets=BACKLOG_BUCKETS,
            registry=r,
        )
        self.handovers = Counter(
            "tokenspool_gateway_handovers",
            "Worker handovers relayed to clients (a request continued by another worker)",
            registry=r,
        )
        self.errors = Counter(
            "tokenspool_gateway_errors",
            "Error answers by HTTP status and error code (429 and 503 are load shedding; 410 an expired resume)",
            ["status", "code"],
            registry=r,
        )

    def count_error(self, error: APIError) -> None:
        """An error answered to a client, on any transport."""
        self.errors.labels(str(error.status), error.code or error.error_type).inc()

    def exposition(self) -> bytes:
        if not self.multiproc_dir:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiproc_dir)
        return generate_latest(merged)

    def process_exited(self) -> None:
        """Drop this process's live gauges from the shared directory (its counters stay: they happened)."""
        if self.multiproc_dir:
            forget_process(self.multiproc_dir, os.getpid())


def forget_process(directory: str, pid: int) -> None:
    """Drop the live gauges of gateway process ``pid`` from the shared ``directory``: what a gateway does as
    it exits, done by its supervisor for one that was killed (its open streams leave ``streams_active``)."""
    multiprocess.mark_process_dead(pid, directory)


class CountResponses:
    """Pure ASGI (it must not buffer streaming bodies): counts responses by route template and status."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.responses.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
