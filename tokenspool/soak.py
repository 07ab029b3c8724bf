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
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from shared import keys, wire
from shared.redis_client import RedisTarget, connect_sync
from tokenspool.checker import classify
from tokenspool.redis_server import EmbeddedCluster, EmbeddedRedis, free_port

MODEL = "soak-sim"


class Stack:
    def __init__(self, url: str, log_dir: Path, lease_s: float) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSPOOL_")}
        self.env.update({"TOKENSPOOL_REDIS_URL": url, "TOKENSPOOL_LOG_LEVEL": "warning"})
        self.log_dir = log_dir
        self.lease_s = lease_s
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.count = 0
        self.gateway_port = free_port()
        self.gateway = self._spawn("gateway", ["gateway", "--port", str(self.gateway_port)])

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "ab") as log_file:
            return subprocess.Popen(
                [sys.executable, "-m", "tokenspool", *argv],
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def add_worker(self) -> str:
        self.count += 1
        worker_id = f"soak-{self.count}"
        self.workers[worker_id] = self._spawn(
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
        return worker_id

    def kill(self, worker_id: str) -> None:
        process = self.workers.pop(worker_id)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def close(self) -> None:
        for process in [*self.workers.values(), self.gateway]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in [*self.workers.values(), self.gateway]:
            try:
                process.wait(45)
            except subprocess.TimeoutExpired:
                print(f"tokenspool soak: process {process.pid} did not stop on SIGTERM; killing it", file=sys.stderr)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


class Trial:
    """One kill: several concurrent streams; when one of them has received ``kill_at`` events, the worker
    holding it is killed; the gap is the time from the kill to that stream's next event."""

    def __init__(self, stack: Stack, client: Any, kill_at: int) -> None:
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
    with httpx.Client(timeout=60) as http, http.stream("POST", base + "/v1/chat/completions", json=body) as response:
        request_id = response.headers["x-request-id"]
        buffer = b""
        for chunk in response.iter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                for line in frame.split(b"\n"):
                    if line.startswith(b"id: "):
                        ids.append(line[4:].decode())
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
        stack = Stack(server.url, log_dir, args.lease_timeout_s)
        client: Any = connect_sync(RedisTarget(server.url))
        base = f"http://127.0.0.1:{stack.gateway_port}"
        try:
            for _ in range(args.workers):
                stack.add_worker()
            deadline = time.monotonic() + 30
            while not (_gateway_up(base) and MODEL in httpx.get(base + "/v1/models").text):
                if time.monotonic() > deadline:
                    raise SystemExit("tokenspool soak: the stack did not start")
                time.sleep(0.2)
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


def _gateway_up(base: str) -> bool:
    try:
        return httpx.get(base + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
