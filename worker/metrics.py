"""Worker metrics (prometheus-client), served on the worker's own metrics port when one is set."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.registry import Collector

from tokenspool.shared.ports import unavailable

WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2)
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class WorkerMetrics:
    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.running = Gauge("tokenspool_worker_running_requests", "Requests this worker runs now", registry=r)
        self.capacity = Gauge("tokenspool_worker_capacity", "Requests this worker can run at once", registry=r)
        self.waiting = Gauge("tokenspool_worker_queue_waiting", "Requests waiting in this model's queue", registry=r)
        self.requests = Counter(
            "tokenspool_worker_requests", "Requests this worker ended, by outcome", ["outcome"], registry=r
        )
        self.output_tokens = Counter("tokenspool_worker_output_tokens", "Tokens generated", registry=r)
        self.claims = Counter(
            "tokenspool_worker_claims", "Requests this worker started (fresh from the queue or taken over)", registry=r
        )
        self.engine_step = Histogram(
            "tokenspool_worker_engine_step_seconds",
            "Time between successive outputs of one request from the engine (one engine step as a request sees it)",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.takeovers = Counter(
            "tokenspool_worker_takeovers", "Requests continued after another worker lost them", registry=r
        )
        self.migrations = Counter(
            "tokenspool_worker_migrations", "Running requests handed to other workers", registry=r
        )
        self.dead_letters = Counter("tokenspool_worker_dead_letters", "Requests given up", registry=r)
        self.queue_wait = Histogram(
            "tokenspool_worker_queue_wait_seconds",
            "From submission to a worker starting the request",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.redis_write = Histogram(
            "tokenspool_worker_redis_write_seconds",
            "One group-commit round trip of appends",
            buckets=WRITE_BUCKETS,
            registry=r,
        )
        self.model = model

    def include(self, collectors: Iterable[Collector]) -> None:
        """Serve ``collectors`` (an engine's own metrics) beside the worker's."""
        for collector in collectors:
            self.registry.register(collector)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``host:port`` from a thread; :class:`PortUnavailableError` when the port is
        taken."""
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise unavailable(
                "the worker's metrics port", host, port, "TOKENSPOOL_METRICS_PORT, --metrics-port", exc
            ) from None
