"""``tokenspool status``: what an operator needs at a glance, read from Redis (a table, or ``--json``)."""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis

from tokenspool.shared import keys, registry, wire
from tokenspool.shared.redis_client import RedisTarget, RedisUnreachableError, check_reachable, connect_sync


def used_memory_bytes(client: Any) -> int:
    """The server's memory, summed over the primaries of a cluster (replicas hold copies)."""
    if isinstance(client, redis.RedisCluster):
        per_node: Any = client.info("memory", target_nodes=redis.RedisCluster.PRIMARIES)
        return sum(int(info["used_memory"]) for info in per_node.values())
    memory: Any = client.info("memory")
    return int(memory["used_memory"])


def collect(target: RedisTarget, worker_ttl_s: float) -> dict[str, Any]:
    check_reachable(target)
    client: Any = connect_sync(target)
    try:
        now = int(time.time() * 1000)
        infos = []
        for raw in client.hgetall(keys.workers_key()).values():
            try:
                infos.append(wire.decode(raw, wire.WorkerInfo))
            except wire.WireError:
                continue
        workers = [
            {
                "id": info.worker_id,
                "host": info.host,
                "model": info.model,
                "engine": info.engine,
                "state": info.state if registry.is_live(info, now, worker_ttl_s) or info.state == "stopped" else "dead",
                "running": info.running,
                "capacity": info.capacity,
                "last_heartbeat_s": round((now - info.heartbeat_ms) / 1000, 1),
            }
            for info in sorted(infos, key=lambda i: (i.model, i.worker_id))
        ]
        models: dict[str, Any] = {}
        for model in sorted({info.model for info in infos}):
            queue = keys.queue_key(model)
            length = int(client.xlen(queue))
            try:
                pending: Any = client.xpending(queue, keys.WORKER_GROUP)
            except redis.ResponseError:
                pending = {"pending": 0, "consumers": []}
            per_worker = {
                c["name"].decode() if isinstance(c["name"], bytes) else c["name"]: int(c["pending"])
                for c in pending.get("consumers") or []
            }
            lag: int | None = None
            try:
                for group in client.xinfo_groups(queue):
                    name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
                    if name == keys.WORKER_GROUP and group.get("lag") is not None:
                        lag = int(group["lag"])
            except redis.ResponseError:
                pass  # no queue yet
            models[model] = {
                "waiting": max(0, length - int(pending["pending"])),
                "running": int(pending["pending"]),
                "group_lag": lag,
                "pending_per_worker": per_worker,
                "dead_letters": int(client.xlen(keys.dead_letter_key(model))),
            }
        retained = sum(1 for _ in client.scan_iter(match=f"{keys.PREFIX}:{{p*}}:r:*:ev", count=1000))
        return {
            "workers": workers,
            "models": models,
            "retained_streams": retained,
            "redis_used_memory_bytes": used_memory_bytes(client),
        }
    finally:
        client.close()


def render(status: dict[str, Any]) -> str:
    lines = [f"{'WORKER':34} {'MODEL':20} {'ENGINE':6} {'STATE':9} {'RUNNING':>9} {'HEARTBEAT':>10}"]
    for w in status["workers"]:
        lines.append(
            f"{w['id']:34} {w['model']:20} {w['engine']:6} {w['state']:9} "
            f"{w['running']:>4}/{w['capacity']:<4} {w['last_heartbeat_s']:>9}s"
        )
    lines.append("")
    lines.append(
        f"{'MODEL':20} {'WAITING':>8} {'RUNNING':>8} {'GROUP LAG':>10} {'DEAD LETTERS':>13}  PENDING PER WORKER"
    )
    for name, m in status["models"].items():
        lag = "-" if m["group_lag"] is None else m["group_lag"]
        per_worker = ", ".join(f"{worker}={count}" for worker, count in sorted(m["pending_per_worker"].items()))
        lines.append(
            f"{name:20} {m['waiting']:>8} {m['running']:>8} {lag:>10} {m['dead_letters']:>13}  {per_worker or '-'}"
        )
    lines.append("")
    lines.append(
        f"retained request streams: {status['retained_streams']}; "
        f"Redis memory: {status['redis_used_memory_bytes'] / 1_048_576:.1f} MiB"
    )
    return "\n".join(lines)


def run(target: RedisTarget | None, as_json: bool, worker_ttl_s: float) -> int:
    import sys

    if target is None:
        print("tokenspool status: TOKENSPOOL_REDIS_URL (or --redis-url) is required", file=sys.stderr)
        return 2
    try:
        status = collect(target, worker_ttl_s)
    except RedisUnreachableError as exc:
        print(f"tokenspool status: {exc}", file=sys.stderr)
        return 2
    print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode() if as_json else render(status))
    return 0
