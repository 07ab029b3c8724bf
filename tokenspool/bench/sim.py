"""The sim engine as the floor and the naive relay run it: built from the bench's flags, fed chat bodies."""

from __future__ import annotations

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
