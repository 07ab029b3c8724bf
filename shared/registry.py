"""The worker registry: workers announce themselves and heartbeat; gateways and operators read it."""

from __future__ import annotations

from tokenspool.shared import keys, wire
from tokenspool.shared.redis_client import AsyncRedis


async def publish(client: AsyncRedis, info: wire.WorkerInfo) -> None:
    await client.hset(keys.workers_key(), info.worker_id, wire.encode(info))


async def read_all(client: AsyncRedis) -> list[wire.WorkerInfo]:
    """Every registered worker, live or not; entries that do not decode are skipped."""
    raw: dict[bytes, bytes] = await client.hgetall(keys.workers_key())  # type: ignore[assignment]
    out: list[wire.WorkerInfo] = []
    for payload in raw.values():
        try:
            out.append(wire.decode(payload, wire.WorkerInfo))
        except wire.WireError:
            continue
    return out


async def take_command(client: AsyncRedis, worker_id: str) -> str | None:
    """The operator command waiting for this worker, removed as it is read."""
    pipe = client.pipeline(transaction=True)
    pipe.hget(keys.commands_key(), worker_id)
    pipe.hdel(keys.commands_key(), worker_id)
    command, _ = await pipe.execute()
    return command.decode() if command else None


def is_live(info: wire.WorkerInfo, now_ms: int, ttl_s: float) -> bool:
    return info.state != "stopped" and now_ms - info.heartbeat_ms <= ttl_s * 1000
