"""``tokenspool soak``: kill workers with SIGKILL mid-stream, many times, on a private stack (embedded
server, or with ``--redis-cluster N`` an embedded N-node Redis Cluster; sim workers, one gateway), and check
every stream with :mod:`tokenspool.checker`.

It prints the verdicts, the failover gap (from the kill to the next event the client receives; p50 and
max) and the totals, and exits non-zero on any verdict but ``ok``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from tokenspool.checker import classify
from tokenspool.client_core import SSEDecoder, SSEMessage
from tokenspool.redis_server import EmbeddedCluster, EmbeddedRedis, free_port
from tokenspool.shared import keys, wire
from tokenspool.shared.redis_client import RedisTarget, connect_sync
from tokenspool.stack import Stack, StackError, child_env, model_listed

MODEL = "soak-sim"


class SoakStack:
    """One gateway and the sim workers being killed, on one Redis URL; logs in ``log_dir``."""

    def __init__(self, url: str, log_dir: Path, lease_s: float) -> None:
        self.processes = Stack({**child_env(os.environ, url), "TOKENSPOOL_LOG_LEVEL": "warning"}, log_dir)
        self.lease_s = lease_s
        self.workers: set[str] = set()
        self.count = 0
        self.gateway_port = free_port()
        self.processes.start("gateway", ["gateway", "--port", str(self.gateway_port)])

    def add_worker(self) -> str:
        self.count += 1
        worker_id = f"soak-{self.count}"
        self.processes.start(
            worker_id,
            [
                "worker",
                "--id",
                worker_id,
                "--model",
                MODEL,
                "--sim-itl-ms",
                "10",
                "--sim-default-max-tokens",
                "4000",
                "--lease-timeout-s",
                str(self.lease_s),
                "--worker-heartbeat-s",
                str(self.lease_s / 5),
                "--drain-timeout-s",
                "5",
            ],
        )
        self.workers.add(worker_id)
        return worker_id

    def kill(self, worker_id: str) -> None:
        self.workers.discard(worker_id)
        self.processes.kill(worker_id)

    def close(self) -> None:
        self.processes.stop(list(self.processes.processes), timeout_s=45)


class Trial:
    """One kill: several concurrent streams; when one of them has received ``kill_at`` events, the worker
    holding it is killed; the gap is the time from the kill to that stream's next event."""

    def __init__(self, stack: SoakStack, client: Any, kill_at: int) -> None:
        self.stack = stack
        self.client = client
        self.kill_at = kill_at
        self.lock = threading.Lock()
        self.killed_at: float | None = None
        self.victim_request: str | None = None
        self.gap: float | None = None
        self.results: list[tuple[str, list[str]]] = []

    def on_event(self, request_id: str, count: int) -> None:
        with self.lock:
            if self.killed_at is None and count == self.kill_at:
                holder = self.client.hget(keys.RequestKeys.of(request_id).meta, "worker")
                worker_id = holder.decode() if holder else ""
                if worker_id in self.stack.workers:
                    self.stack.kill(worker_id)
                    self.killed_at, self.victim_request = time.monotonic(), request_id
            elif self.victim_request == request_id and self.gap is None and self.killed_at is not None:
                self.gap = time.monotonic() - self.killed_at

    def _stream(self, base: str, body: dict[str, Any]) -> None:
        self.results.append(read_stream(base, body, self.on_event))

    def run(
        self, base: str, trial: int, streams: int, max_tokens: int
    ) -> tuple[list[tuple[str, list[str]]], float | None]:
        threads = []
        for index in range(streams):
            body = {
                "model": MODEL,
                "max_tokens": max_tokens,
                "seed": trial * 100 + index,
                "stream": True,
                "messages": [{"role": "user", "content": f"soak {trial} {index}"}],
            }
            threads.append(threading.Thread(target=self._stream, args=(base, body)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        return self.results, self.gap


def read_stream(base: str, body: dict[str, Any], on_event: Any) -> tuple[str, list[str]]:
    ids: list[str] = []
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST", base + "/v1/chat/completions", json=body, headers={"Accept": "text/event-stream"}
        ) as response,
    ):
        request_id = response.headers["x-request-id"]
        decoder = SSEDecoder()
        for chunk in response.iter_raw():
            for item in decoder.feed(chunk):
                if isinstance(item, SSEMessage) and item.id is not None:
                    ids.append(item.id)
                    on_event(request_id, len(ids))
    return request_id, ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenspool soak", description=__doc__)
    parser.add_argument("--trials", type=int, default=50, help="worker kills")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams per trial")
    parser.add_argument("--max-tokens", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lease-timeout-s", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-dir", default=None, help="keep the processes' logs here (default: discarded)")
    parser.add_argument(
        "--redis-cluster", type=int, default=0, metavar="N", help="run on an embedded N-node Redis Cluster"
    )
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    verdicts: Counter[str] = Counter()
    gaps: list[float] = []
    with contextlib.ExitStack() as resources:
        scratch = resources.enter_context(tempfile.TemporaryDirectory(prefix="tokenspool-soak-"))
        server = EmbeddedCluster(args.redis_cluster) if args.redis_cluster > 0 else EmbeddedRedis()
        resources.enter_context(server)
        log_dir = Path(args.log_dir or scratch)
        log_dir.mkdir(parents=True, exist_ok=True)
        stack = SoakStack(server.url, log_dir, args.lease_timeout_s)
        client: Any = connect_sync(RedisTarget(server.url))
        base = f"http://127.0.0.1:{stack.gateway_port}"
        try:
            for _ in range(args.workers):
                stack.add_worker()
            try:
                stack.processes.wait_ready(partial(model_listed, base, MODEL), 30)
            except StackError as exc:
                raise SystemExit(f"tokenspool soak: {exc}") from None
            started = time.monotonic()
            for trial in range(args.trials):
                kill_at = rng.randint(1, args.max_tokens - 5)
                results, gap = Trial(stack, client, kill_at).run(base, trial, args.streams, args.max_tokens)
                while len(stack.workers) < args.workers:
                    stack.add_worker()
                if gap is not None:
                    gaps.append(gap)
                for request_id, ids in results:
                    entries: Any = client.xrange(keys.RequestKeys.of(request_id).events)
                    stored = [wire.decode(fields[b"d"], wire.Event) for _id, fields in entries]
                    verdicts[classify(request_id, ids, stored, args.max_tokens)] += 1
                verdicts["missing"] += args.streams - len(results)
            elapsed = time.monotonic() - started
        finally:
            stack.close()
            client.close()
    verdicts = +verdicts
    where = f"a {args.redis_cluster}-node Redis Cluster" if args.redis_cluster > 0 else "one Redis server"
    print(
        f"{args.trials} worker kills, {args.trials * args.streams} streams of {args.max_tokens} tokens "
        f"in {elapsed:.0f}s (lease timeout {args.lease_timeout_s:g}s) on {where}"
    )
    print("verdicts: " + ", ".join(f"{name} {count}" for name, count in sorted(verdicts.items())))
    if gaps:
        print(
            f"failover gap (kill -> next event at the client): p50 {statistics.median(gaps):.3f}s, "
            f"max {max(gaps):.3f}s over {len(gaps)} kills that hit a running stream"
        )
    return 0 if set(verdicts) <= {"ok"} else 1
