"""Closed- and open-loop load over real HTTP/SSE, and the statistics of what came back.

Closed loop: ``concurrency`` virtual users, each sending its next request when the last one ended (after a
random pause shorter than one engine step, so users do not fall in phase with the sim engine's step clock
and hide the broker's latency inside the engine's wait). Open loop: Poisson arrivals at ``rate`` requests/s,
whatever the server does — the load that shows queueing. Both stop sending after ``duration_s`` and wait
for what is in flight.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from tokenspool.bench.sse_client import StreamRecord, stream_request

Mode = Literal["closed", "open"]


@dataclass(frozen=True, slots=True)
class LoadSpec:
    mode: Mode
    level: float
    """Concurrent users (closed) or requests per second (open)."""
    duration_s: float
    max_tokens: int
    model: str
    step_s: float
    """The engine's step, for the closed loop's de-phasing pause."""
    stagger_s: float = 0.0
    """Closed loop: user ``i`` of ``n`` starts ``i / n`` of this after the first, instead of all at once. Over
    one request's duration it spreads arrivals evenly (steady state); at 0 every user starts together, and
    since replies of one length on one step clock end together, new requests keep arriving in a herd of
    ``level`` at a time."""
    timeout_s: float = 120.0
    max_outstanding: int = 4000


@dataclass(slots=True)
class LoadResult:
    target: str
    spec: LoadSpec
    records: list[StreamRecord] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds each process of the target spent during the run."""
    extra: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.records if r.ok]
        ttft = [r.ttft_s for r in ok]
        itl = [gap for r in ok for gap in r.itl_s]
        e2e = [r.e2e_s for r in ok]
        tokens = sum(r.tokens for r in self.records)
        events = sum(r.events for r in self.records)
        out: dict[str, Any] = {
            "target": self.target,
            "mode": self.spec.mode,
            "stagger_s": self.spec.stagger_s,
            "level": self.spec.level,
            "requests": len(self.records),
            "ok": len(ok),
            "errors": len(self.records) - len(ok),
            "lost_events": sum(r.lost for r in self.records),
            "duplicated_events": sum(r.duplicated for r in self.records),
            "output_tokens_per_s": tokens / self.wall_s if self.wall_s else 0.0,
            "events_per_s": events / self.wall_s if self.wall_s else 0.0,
            "wall_s": self.wall_s,
        }
        for name, values in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
            for q in (50, 90, 99):
                out[f"{name}_p{q}_ms"] = percentile(values, q) * 1000
        out["cpu_s"] = dict(self.cpu_s)
        if events:
            out["cpu_us_per_event"] = {name: cpu / events * 1e6 for name, cpu in self.cpu_s.items()}
        out.update(self.extra)
        errors = [r.error for r in self.records if not r.ok]
        if errors:
            out["first_errors"] = sorted(set(errors))[:3]
        return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def chat_body(model: str, index: int, max_tokens: int) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": f"benchmark request {index}"}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
    )


async def run_load(
    spec: LoadSpec, host: str, port: int, path: str, progress: Callable[[int, int], None] | None = None
) -> tuple[list[StreamRecord], float]:
    """Drive one load level; (records, wall seconds from first send to last reply)."""
    records: list[StreamRecord] = []
    started = time.perf_counter()
    deadline = started + spec.duration_s
    counter = iter(range(1 << 62))

    async def one() -> None:
        index = next(counter)
        record = await stream_request(
            host,
            port,
            path,
            chat_body(spec.model, index, spec.max_tokens),
            expected_tokens=spec.max_tokens,
            started_s=time.perf_counter() - started,
            timeout_s=spec.timeout_s,
        )
        records.append(record)
        if progress is not None:
            progress(len(records), sum(1 for r in records if not r.ok))

    if spec.mode == "closed":

        async def user(seed: int) -> None:
            rng = random.Random(seed)
            await asyncio.sleep(spec.stagger_s * seed / spec.level)
            while time.perf_counter() < deadline:
                await asyncio.sleep(rng.uniform(0, spec.step_s))
                await one()

        await asyncio.gather(*(user(i) for i in range(int(spec.level))))
    else:
        rng = random.Random(12345)
        tasks: set[asyncio.Task[None]] = set()
        next_at = started
        while True:
            next_at += rng.expovariate(spec.level)
            if next_at >= deadline:
                break
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= spec.max_outstanding:
                records.append(StreamRecord(started_s=time.perf_counter() - started, error="client overloaded"))
                continue
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return records, time.perf_counter() - started
