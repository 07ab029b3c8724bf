"""Operator commands sent to workers through Redis: ``tokenspool drain`` and ``tokenspool rebalance``."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from tokenspool.shared import keys, registry, wire
from tokenspool.shared.redis_client import RedisTarget, RedisUnreachableError, check_reachable, connect_sync


def _workers(client: Any) -> dict[str, wire.WorkerInfo]:
    out = {}
    for raw in client.hgetall(keys.workers_key()).values():
        try:
            info = wire.decode(raw, wire.WorkerInfo)
        except wire.WireError:
            continue
        out[info.worker_id] = info
    return out


def _connect(target: RedisTarget | None, command: str) -> Any:
    if target is None:
        raise SystemExit(f"tokenspool {command}: TOKENSPOOL_REDIS_URL (or --redis-url) is required")
    try:
        check_reachable(target)
    except RedisUnreachableError as exc:
        raise SystemExit(f"tokenspool {command}: {exc}") from None
    return connect_sync(target)


def drain(
    target: RedisTarget | None, worker_id: str, *, migrate: bool, wait: bool, timeout_s: float, ttl_s: float
) -> int:
    """Ask one worker to stop pulling and exit: after finishing its requests, or (``migrate``) after
    handing them to other workers at once. With ``wait``, return when it has stopped."""
    client = _connect(target, "drain")
    try:
        info = _workers(client).get(worker_id)
        if info is None or not registry.is_live(info, int(time.time() * 1000), ttl_s):
            print(f"tokenspool drain: no live worker {worker_id!r} (see `tokenspool status`)", file=sys.stderr)
            return 2
        client.hset(keys.commands_key(), worker_id, "migrate" if migrate else "drain")
        print(f"asked worker {worker_id} to {'migrate its requests and stop' if migrate else 'drain and stop'}")
        if not wait:
            return 0
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = _workers(client).get(worker_id)
            if info is None or info.state == "stopped" or not registry.is_live(info, int(time.time() * 1000), ttl_s):
                print(f"worker {worker_id} stopped")
                return 0
            time.sleep(0.2)
        print(f"tokenspool drain: worker {worker_id} still running after {timeout_s:.0f}s", file=sys.stderr)
        return 1
    finally:
        client.close()


def plan_rebalance(workers: list[wire.WorkerInfo]) -> dict[str, int]:
    """How many running requests each over-loaded worker of one model should hand over: everyone ends
    up near the mean, and nobody sheds into a model with no spare capacity."""
    if len(workers) < 2:
        return {}
    running = sum(w.running for w in workers)
    target = math.ceil(running / len(workers))
    intake = sum(max(0, min(w.capacity, target) - w.running) for w in workers)
    plan = {}
    for worker in sorted(workers, key=lambda w: -w.running):
        excess = min(worker.running - target, intake)
        if excess > 0:
            plan[worker.worker_id] = excess
            intake -= excess
    return plan


def rebalance(target: RedisTarget | None, ttl_s: float) -> int:
    client = _connect(target, "rebalance")
    try:
        now = int(time.time() * 1000)
        live = [w for w in _workers(client).values() if registry.is_live(w, now, ttl_s) and w.state == "active"]
        asked = 0
        for model in sorted({w.model for w in live}):
            for worker_id, count in plan_rebalance([w for w in live if w.model == model]).items():
                client.hset(keys.commands_key(), worker_id, f"shed {count}")
                print(f"{model}: worker {worker_id} hands {count} running request(s) to idle workers")
                asked += 1
        if not asked:
            print("nothing to rebalance")
        return 0
    finally:
        client.close()
