"""What waiting for replicas (``TOKENSPOOL_REDIS_MIN_REPLICAS_ACKED``) costs per engine step, measured.

One engine step of a worker is one outbox round trip: the append script for every running request (one call
per partition) and, in that mode, one closing ``WAIT``. This runs that round trip through the worker's own
code (:meth:`RequestStore.append_batch`) against a private primary with one replica (the bundled server on
loopback), with and without the ``WAIT``, side by side in one run: the two modes alternate in blocks of
steps, so a drift of the machine touches both alike. Reported per step: round-trip latency (median and p99),
the client's CPU, and the primary's and the replica's CPU (``INFO cpu``).

    python -m tokenspool.bench.replica_acks --requests 64 --steps 2000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from tokenspool.redis_server import EmbeddedSentinelGroup
from tokenspool.shared import keys, wire
from tokenspool.shared.keys import RequestKeys
from tokenspool.shared.redis_client import RedisTarget, connect, connect_sync
from tokenspool.shared.settings import CommonSettings
from tokenspool.shared.store import Append, RequestStore

BLOCK_STEPS = 100


@dataclass
class ModeFigures:
    latencies_s: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0
    primary_cpu_s: float = 0.0
    replica_cpu_s: float = 0.0
    unconfirmed_steps: int = 0

    def summary(self) -> dict[str, float]:
        steps = len(self.latencies_s)
        ordered = sorted(self.latencies_s)
        return {
            "steps": steps,
            "latency_p50_us": statistics.median(ordered) * 1e6,
            "latency_p99_us": ordered[int(steps * 0.99) - 1] * 1e6,
            "client_cpu_us_per_step": self.client_cpu_s / steps * 1e6,
            "primary_cpu_us_per_step": self.primary_cpu_s / steps * 1e6,
            "replica_cpu_us_per_step": self.replica_cpu_s / steps * 1e6,
            "unconfirmed_steps": self.unconfirmed_steps,
        }


def _server_cpu_s(client: Any) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def _run(group: EmbeddedSentinelGroup, requests: int, steps: int, replicas: int) -> dict[str, ModeFigures]:
    target = RedisTarget(group.url)
    client = connect(
        target, name="tokenspool:bench:replica-acks", max_connections=CommonSettings().redis_pool_connections
    )
    primary_node = group.primary()
    replica_node = next(node for node in group.nodes if node is not primary_node)
    primary: Any = connect_sync(RedisTarget(f"redis://127.0.0.1:{primary_node.port}/0"))
    replica: Any = connect_sync(RedisTarget(f"redis://127.0.0.1:{replica_node.port}/0"))
    stores = {
        "without WAIT": RequestStore(client, CommonSettings()),
        "with WAIT": RequestStore(
            client, CommonSettings(redis_min_replicas_acked=replicas, redis_replica_ack_timeout_ms=1000)
        ),
    }
    request_ids = [keys.new_request_id("chat") for _ in range(requests)]
    for request_id in request_ids:
        meta = keys.RequestKeys.of(request_id).meta
        await client.hset(meta, mapping={"state": "running", "attempt": 1, "last_seq": 0})
    await stores["without WAIT"].load_scripts()
    payload = wire.encode(wire.Event("delta", " token", (1,)))
    figures = {mode: ModeFigures() for mode in stores}
    seq = 0
    try:
        for _block in range(steps // BLOCK_STEPS):
            for mode, store in stores.items():
                got = figures[mode]
                cpu, primary_cpu, replica_cpu = time.process_time(), _server_cpu_s(primary), _server_cpu_s(replica)
                for _ in range(BLOCK_STEPS):
                    seq += 1
                    batch = [Append(RequestKeys.of(rid), 1, seq, [payload], refresh_ttl=False) for rid in request_ids]
                    started = time.perf_counter()
                    results, shortfall = await store.append_batch(batch, 100_000)
                    got.latencies_s.append(time.perf_counter() - started)
                    got.unconfirmed_steps += shortfall is not None
                    if any(isinstance(r, Exception) or r[0] < 0 for r in results):
                        raise RuntimeError(f"an append failed: {results[:3]}")
                got.client_cpu_s += time.process_time() - cpu
                got.primary_cpu_s += _server_cpu_s(primary) - primary_cpu
                got.replica_cpu_s += _server_cpu_s(replica) - replica_cpu
    finally:
        await client.aclose()
        primary.close()
        replica.close()
    return figures


def measure(requests: int, steps: int, replicas: int = 1) -> dict[str, dict[str, float]]:
    """Per mode ("without WAIT", "with WAIT"): the figures of :meth:`ModeFigures.summary`."""
    with EmbeddedSentinelGroup(replicas=replicas, sentinels=1) as group:
        figures = asyncio.run(_run(group, requests, max(steps, BLOCK_STEPS), replicas))
    return {mode: got.summary() for mode, got in figures.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenspool.bench.replica_acks", description=__doc__)
    parser.add_argument("--requests", type=int, default=64, help="running requests (one event each per step)")
    parser.add_argument("--steps", type=int, default=2000, help="engine steps per mode")
    args = parser.parse_args(argv)
    result = measure(args.requests, args.steps)
    base, waited = result["without WAIT"], result["with WAIT"]
    print(f"{args.requests} running requests, one event each per engine step, {int(base['steps'])} steps per mode")
    for name in base:
        ratio = waited[name] / base[name] if base[name] else float("nan")
        print(f"{name:26} {base[name]:>12.1f} {waited[name]:>12.1f}   x{ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
