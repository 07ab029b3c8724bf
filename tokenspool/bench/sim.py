"""The sim engine as the floor and the comparison brokers (naive, lean) run it: built from the bench's flags, fed chat
bodies; and those brokers' command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from typing import Any

from tokenspool import settings as settings_of
from tokenspool.shared import wire
from tokenspool.worker.engines.base import EngineRequest
from tokenspool.worker.engines.sim import SimEngine
from tokenspool.worker.settings import WorkerSettings


def sim_engine(ttft_ms: str, itl_ms: str) -> SimEngine:
    """The same engine tokenspool's workers run, with room for every request the benchmark sends."""
    settings = settings_of.load(
        WorkerSettings, {}, {"sim_ttft_ms": ttft_ms, "sim_itl_ms": itl_ms, "max_num_seqs": "100000"}
    )
    return SimEngine(settings)


def chat_request(request_id: str, body: dict[str, Any]) -> EngineRequest:
    """An OpenAI chat body (what the benchmark's client sends) as an engine request."""
    return EngineRequest(
        request_id=request_id,
        kind="chat",
        prompt="",
        messages=tuple(wire.ChatMessage(m["role"], m["content"]) for m in body["messages"]),
        sampling=wire.SamplingOptions(max_tokens=body.get("max_tokens"), ignore_eos=bool(body.get("ignore_eos"))),
    )


def run_broker(
    module: str,
    doc: str,
    argv: list[str] | None,
    worker: Callable[[str, str, str, str], Coroutine[Any, Any, None]],
    gateway: Callable[[str, int], None],
) -> None:
    """A comparison broker's command line, ``python -m <module> gateway|worker ...``: runs ``worker(redis_url,
    consumer, sim_ttft_ms, sim_itl_ms)`` under uvloop, or ``gateway(redis_url, port)``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    parser.add_argument("role", choices=("gateway", "worker"))
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--sim-ttft-ms", default="50")
    parser.add_argument("--sim-itl-ms", default="20")
    args = parser.parse_args(argv)
    if args.role == "gateway":
        gateway(args.redis_url, args.port)
        return
    import uvloop

    consumer = module.rpartition(".")[2] + "-worker"
    uvloop.run(worker(args.redis_url, consumer, args.sim_ttft_ms, args.sim_itl_ms))
