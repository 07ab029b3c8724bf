"""``tokenspool footprint``: how much Redis memory a retained request costs, measured on a private stack.

It starts the embedded server, one sim worker and one gateway, runs ``--requests`` real requests of
``--tokens`` tokens each through the gateway, and reports what Redis holds for them afterwards: bytes per
request and per retained event (token), from ``MEMORY USAGE`` of each request's keys and from the
server's ``used_memory`` before and after. These are the figures the operations guide sizes Redis with.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from tokenspool.redis_server import EmbeddedRedis, free_port
from tokenspool.shared import keys
from tokenspool.shared.redis_client import RedisTarget, connect_sync
from tokenspool.stack import Stack, child_env, model_listed

MODEL = "footprint-sim"


def measure(requests: int, tokens: int, concurrency: int, log_dir: Path) -> dict[str, float]:
    with (
        EmbeddedRedis(data_dir=log_dir / "redis") as server,
        Stack({**child_env(os.environ, server.url), "TOKENSPOOL_LOG_LEVEL": "warning"}, log_dir) as stack,
    ):
        client: Any = connect_sync(RedisTarget(server.url), socket_timeout_s=30)
        port = free_port()
        stack.start(
            "worker", ["worker", "--model", MODEL, "--sim-ttft-ms", "0", "--sim-itl-ms", "0", "--max-num-seqs", "64"]
        )
        stack.start("gateway", ["gateway", "--port", str(port)])
        url = f"http://127.0.0.1:{port}"
        try:
            stack.wait_ready(partial(model_listed, url, MODEL), 60)
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "size me"}],
                "max_tokens": tokens,
                "ignore_eos": True,
            }
            httpx.post(url + "/v1/chat/completions", json=body, timeout=60).raise_for_status()  # warm up
            before = int(client.info("memory")["used_memory"])
            retained_before = set(client.scan_iter(match=f"{keys.PREFIX}:{{p*}}:r:*", count=1000))

            def one(index: int) -> str:
                payload = {**body, "messages": [{"role": "user", "content": f"size me {index}"}]}
                response = httpx.post(url + "/v1/chat/completions", json=payload, timeout=120)
                response.raise_for_status()
                return str(response.json()["id"])

            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                ids = list(pool.map(one, range(requests)))
            after = int(client.info("memory")["used_memory"])
            per_request: list[int] = []
            per_stream: list[int] = []
            per_meta: list[int] = []
            events = 0
            for request_id in ids:
                request_keys = keys.RequestKeys.of(request_id)
                names = [request_keys.events, request_keys.meta, request_keys.job, request_keys.attached]
                usage = [int(client.memory_usage(name, samples=0) or 0) for name in names]
                per_request.append(sum(usage))
                per_stream.append(usage[0])
                per_meta.append(usage[1])
                events += int(client.xlen(request_keys.events))
            new_keys = set(client.scan_iter(match=f"{keys.PREFIX}:{{p*}}:r:*", count=1000)) - retained_before
            return {
                "requests": requests,
                "tokens_per_request": tokens,
                "events_per_request": events / requests,
                "keys_per_request": len(new_keys) / requests,
                "bytes_per_request_keys": statistics.mean(per_request),
                "bytes_per_event_stream": statistics.mean(per_stream) / (events / requests),
                "bytes_per_tombstone": statistics.mean(per_meta),
                "bytes_per_request_used_memory": (after - before) / requests,
                "bytes_per_event_used_memory": (after - before) / events,
            }
        finally:
            client.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tokenspool footprint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests to run and keep (default 200)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens per request (default 100)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (default 16)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.tokens < 1 or args.concurrency < 1:
        parser.error("--requests, --tokens and --concurrency must be at least 1")
    with tempfile.TemporaryDirectory(prefix="tokenspool-footprint-") as tmp:
        result = measure(args.requests, args.tokens, args.concurrency, Path(tmp))
    print(f"{result['requests']:.0f} requests of {result['tokens_per_request']:.0f} tokens (sim engine), retained:")
    print(f"  events per request:            {result['events_per_request']:.1f}")
    print(f"  keys per request:              {result['keys_per_request']:.1f}")
    print(f"  bytes per request (its keys):  {result['bytes_per_request_keys']:.0f}")
    print(f"  bytes per event (its stream):  {result['bytes_per_event_stream']:.1f}")
    print(f"  bytes per tombstone (the metadata kept after retention): {result['bytes_per_tombstone']:.0f}")
    print(f"  bytes per request (used_memory delta): {result['bytes_per_request_used_memory']:.0f}")
    print(f"  bytes per event (used_memory delta):   {result['bytes_per_event_used_memory']:.1f}")
    return 0
