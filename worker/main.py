"""Worker process entry: build the engine and Redis clients, run until a signal, exit with a status."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket

from tokenspool.shared.redis_client import RedisTarget, connect, connection_name
from tokenspool.worker.engines.base import Engine, EngineDeadError
from tokenspool.worker.service import PULL_BLOCK_MS, Worker
from tokenspool.worker.settings import WorkerSettings

log = logging.getLogger("tokenspool.worker")


def build_engine(settings: WorkerSettings) -> Engine:
    if settings.engine == "sim":
        from tokenspool.worker.engines.sim import SimEngine

        return SimEngine(settings)
    from tokenspool.worker.engines.vllm_engine import VllmEngine

    engine: Engine = VllmEngine(settings)
    return engine


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


async def serve(settings: WorkerSettings) -> int:
    """Run one worker until SIGTERM/SIGINT (drain, then exit 0) or an engine failure (exit 1)."""
    assert settings.redis_url is not None
    engine = build_engine(settings)
    if engine.name == "sim":
        log.warning("engine: SIMULATED (deterministic filler words for broker tests and demos, not a model)")
    target = RedisTarget.of(settings)
    worker_id = settings.worker_id or default_worker_id()
    name = connection_name("tokenspool", "worker", worker_id)
    client = connect(target, name=f"{name}:commands", max_connections=settings.redis_pool_connections)
    # The queue read blocks server-side: one connection of its own, which only the pull loop uses.
    pull_client = connect(target, name=f"{name}:queue", max_connections=1, socket_timeout_s=PULL_BLOCK_MS / 1000 + 10)
    worker = Worker(settings, engine, client, pull_client, worker_id)
    engine_failed = False
    try:
        if settings.metrics_port is not None:
            # Before the engine starts: a busy port is reported at once, not after a model has loaded.
            worker.metrics.serve(settings.metrics_port, settings.metrics_host)
            log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
        await engine.start()
        worker.metrics.include(engine.metric_collectors())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await worker.run(stop)
    except* EngineDeadError as group:
        log.error("engine failed: %s; unfinished requests stay claimable in the queue", group.exceptions[0])
        engine_failed = True
    finally:
        await engine.shutdown()
        await pull_client.aclose()
        await client.aclose()
    log.info("worker %s stopped", worker.worker_id)
    return 1 if engine_failed else 0
