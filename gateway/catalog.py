"""Which models the gateway accepts: those that registered workers serve, read from the registry and
cached for a second so a burst of requests costs one registry read."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tokenspool.shared import registry, wire
from tokenspool.shared.redis_client import AsyncRedis
from tokenspool.shared.store import now_ms


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    owned_by: str
    live_workers: int
    capacity: int
    last_seen_ms: int
    max_model_len: int
    """The smallest context length among its workers (0: no limit)."""
    unsupported: frozenset[str]
    engine: str = ""
    """The engine its workers run (``sim`` or ``vllm``), for messages."""

    @property
    def refuses_late(self) -> bool:
        """Whether its workers validate the OpenAI body themselves (vLLM's own protocol classes and
        renderer) and may refuse, as the request's first event, what the gateway accepted."""
        return self.engine == "vllm"


class ModelCatalog:
    def __init__(self, client: AsyncRedis, *, worker_ttl_s: float, model_grace_s: float, cache_s: float = 1.0) -> None:
        self._client = client
        self._worker_ttl_s = worker_ttl_s
        self._grace_ms = model_grace_s * 1000
        self._cache_s = cache_s
        self._cached: dict[str, ModelEntry] = {}
        self._cached_at = float("-inf")

    async def models(self) -> dict[str, ModelEntry]:
        """Every model a worker served within the grace period, with its live workers counted."""
        if time.monotonic() - self._cached_at < self._cache_s:
            return self._cached
        workers = await registry.read_all(self._client)
        now = now_ms()
        out: dict[str, ModelEntry] = {}
        for info in workers:
            if now - info.heartbeat_ms > self._grace_ms and not registry.is_live(info, now, self._worker_ttl_s):
                continue
            live = registry.is_live(info, now, self._worker_ttl_s)
            prev = out.get(info.model)
            out[info.model] = ModelEntry(
                name=info.model,
                owned_by=info.owned_by,
                live_workers=(prev.live_workers if prev else 0) + int(live),
                capacity=(prev.capacity if prev else 0) + (info.capacity if live else 0),
                last_seen_ms=max(prev.last_seen_ms if prev else 0, info.heartbeat_ms),
                max_model_len=min(
                    (n for n in (prev.max_model_len if prev else 0, info.max_model_len) if n > 0), default=0
                ),
                unsupported=(prev.unsupported if prev else frozenset()) | frozenset(info.unsupported),
                engine=info.engine,
            )
        self._cached, self._cached_at = out, time.monotonic()
        return out

    async def live_workers(self) -> list[wire.WorkerInfo]:
        now = now_ms()
        return [w for w in await registry.read_all(self._client) if registry.is_live(w, now, self._worker_ttl_s)]
