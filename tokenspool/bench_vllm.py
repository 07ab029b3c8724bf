"""``tokenspool bench-vllm``: the same model and load behind vLLM's own OpenAI server and behind tokenspool.

Both are driven by one asyncio client over HTTP/SSE (OpenAI streaming chat completions, closed loop at a
fixed concurrency), one after the other on the same machine, with the same CPU split: vLLM's engine
processes confined to ``--engine-cpus``, everything else free. It prints time to first token,
inter-token latency, end-to-end latency and output tokens/s (p50, p99) for both, and their ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson

from tokenspool.client_core import SSEDecoder, SSEMessage
from tokenspool.redis_server import EmbeddedRedis, free_port
from tokenspool.stack import Stack, child_env, model_listed
from tokenspool.worker.settings import parse_cpu_list

SERVED_NAME = "bench-model"
START_TIMEOUT_S = 600.0
"""Loading a model and compiling it takes minutes on CPUs."""
STOP_TIMEOUT_S = 60.0


@dataclass
class RequestTiming:
    ttft_s: float
    itl_s: list[float]
    total_s: float
    tokens: int


@dataclass
class RunResult:
    name: str
    timings: list[RequestTiming] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0

    def percentile(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def summary(self) -> dict[str, float]:
        ttft = [t.ttft_s for t in self.timings]
        itl = [gap for t in self.timings for gap in t.itl_s]
        total = [t.total_s for t in self.timings]
        tokens = sum(t.tokens for t in self.timings)
        return {
            "ttft_p50_ms": self.percentile(ttft, 0.5) * 1000,
            "ttft_p99_ms": self.percentile(ttft, 0.99) * 1000,
            "itl_p50_ms": self.percentile(itl, 0.5) * 1000,
            "itl_p99_ms": self.percentile(itl, 0.99) * 1000,
            "e2e_p50_ms": self.percentile(total, 0.5) * 1000,
            "e2e_p99_ms": self.percentile(total, 0.99) * 1000,
            "output_tokens_per_s": tokens / self.wall_s if self.wall_s else float("nan"),
            "requests": len(self.timings),
            "errors": self.errors,
        }


async def one_request(client: httpx.AsyncClient, url: str, index: int, max_tokens: int) -> RequestTiming:
    body = {
        "model": SERVED_NAME,
        "messages": [{"role": "user", "content": f"benchmark request {index}: tell me about rivers"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    decoder = SSEDecoder()
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]!r}")
        async for chunk in response.aiter_raw():
            for item in decoder.feed(chunk):
                if not isinstance(item, SSEMessage) or item.data == "[DONE]":
                    continue
                data = item.json()
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                if data.get("choices") and data["choices"][0].get("delta", {}).get("content"):
                    arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError("no content streamed")
    return RequestTiming(
        ttft_s=arrivals[0] - start,
        itl_s=[b - a for a, b in itertools.pairwise(arrivals)],
        total_s=arrivals[-1] - start,
        tokens=tokens,
    )


async def drive(name: str, base_url: str, requests: int, concurrency: int, max_tokens: int) -> RunResult:
    result = RunResult(name)
    url = base_url + "/v1/chat/completions"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await one_request(client, url, -1, 8)  # warm-up, not counted

        async def loop() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                try:
                    result.timings.append(await one_request(client, url, index, max_tokens))
                except (httpx.HTTPError, RuntimeError) as exc:
                    result.errors += 1
                    print(f"  {name}: request {index} failed: {exc}", file=sys.stderr)

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - started
    return result


def engine_env(args: argparse.Namespace) -> dict[str, str]:
    env = child_env(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cpus = sorted(parse_cpu_list(args.engine_cpus))
    if cpus:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    return env


def engine_flags(args: argparse.Namespace, model: Path) -> list[str]:
    """The engine's flags, the same for ``vllm serve`` and for a tokenspool worker."""
    return [
        *("--model", str(model), "--served-model-name", SERVED_NAME, "--dtype", "float32"),
        *("--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.concurrency)),
    ]


def run_vllm_server(args: argparse.Namespace, model: Path, log_dir: Path) -> RunResult:
    port = free_port()
    cpus = parse_cpu_list(args.engine_cpus)
    argv = [*engine_flags(args, model), "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)]
    base_url = f"http://127.0.0.1:{port}"
    with Stack(engine_env(args), log_dir, log_prefix="vllm-", stop_timeout_s=STOP_TIMEOUT_S) as stack:
        # The server's engine processes inherit the engine CPUs ...
        server = stack.start("server", argv, module="vllm.entrypoints.openai.api_server", cpus=cpus)
        stack.wait_ready(partial(model_listed, base_url, SERVED_NAME), START_TIMEOUT_S, "vllm serve")
        if cpus:
            # ... and once they have started, its HTTP front-end gets every CPU back, exactly as tokenspool's
            # worker front-end does.
            os.sched_setaffinity(server.pid, os.sched_getaffinity(0))
        return asyncio.run(drive("vllm serve", base_url, args.requests, args.concurrency, args.max_tokens))


def run_tokenspool(args: argparse.Namespace, model: Path, log_dir: Path) -> RunResult:
    port = free_port()
    worker_argv = ["worker", "--engine", "vllm", *engine_flags(args, model), "--enforce-eager", "true"]
    worker_argv += ["--engine-cpus", args.engine_cpus]
    base_url = f"http://127.0.0.1:{port}"
    with (
        EmbeddedRedis() as server,
        Stack(
            {**engine_env(args), "TOKENSPOOL_REDIS_URL": server.url, "TOKENSPOOL_LOG_LEVEL": "warning"},
            log_dir,
            log_prefix="tokenspool-",
            stop_timeout_s=STOP_TIMEOUT_S,
        ) as stack,
    ):
        stack.start("worker", worker_argv)
        stack.start("gateway", ["gateway", "--port", str(port)])
        stack.wait_ready(partial(model_listed, base_url, SERVED_NAME), START_TIMEOUT_S, "tokenspool")
        return asyncio.run(drive("tokenspool", base_url, args.requests, args.concurrency, args.max_tokens))


def report(results: list[RunResult]) -> dict[str, Any]:
    summaries = {r.name: r.summary() for r in results}
    base, ours = summaries["vllm serve"], summaries["tokenspool"]
    rows = [
        "ttft_p50_ms",
        "ttft_p99_ms",
        "itl_p50_ms",
        "itl_p99_ms",
        "e2e_p50_ms",
        "e2e_p99_ms",
        "output_tokens_per_s",
        "requests",
        "errors",
    ]
    print(f"\n{'metric':22} {'vllm serve':>12} {'tokenspool':>12} {'ratio':>8}")
    for row in rows:
        ratio = ours[row] / base[row] if base[row] else float("nan")
        print(f"{row:22} {base[row]:12.2f} {ours[row]:12.2f} {ratio:8.3f}")
    print("(ratio = tokenspool / vllm serve; for latencies lower is better, for tokens/s higher is better)")
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenspool bench-vllm", description=__doc__)
    parser.add_argument("--model", default=None, help="model folder (default: a fresh `make-test-model`)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument(
        "--engine-cpus",
        default="0" if (os.cpu_count() or 1) <= 2 else "",
        help="CPUs for vLLM's engine processes (default on 2 cores: 0)",
    )
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokenspool-bench-") as scratch:
        log_dir = Path(scratch)
        if args.model:
            model = Path(args.model)
        else:
            from tokenspool.model_maker import make_test_model

            model = make_test_model(log_dir / "model")
        print(
            f"model {model}, {args.requests} requests x {args.max_tokens} tokens at concurrency "
            f"{args.concurrency}, engine CPUs {args.engine_cpus or 'all'}",
            flush=True,
        )
        results = [run_vllm_server(args, model, log_dir), run_tokenspool(args, model, log_dir)]
        summaries = report(results)
        if args.json:
            Path(args.json).write_bytes(orjson.dumps(summaries, option=orjson.OPT_INDENT_2))
    return 0
