"""The worker's settings: the engine, its capacity, leases and the engine's own arguments (the shared
machinery, and the settings every process has, are in :mod:`tokenspool.shared.settings`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tokenspool.shared.settings import CommonSettings, SettingsError, require_at_least, setting

EngineName = Literal["sim", "vllm"]
LEASE_HEARTBEATS = 2
"""A lease (and a registry entry) must outlast this many heartbeats: it survives one late renewal."""


@dataclass(frozen=True, slots=True)
class WorkerSettings(CommonSettings):
    engine: EngineName = setting("sim", "inference engine: `sim` (simulated, for tests and demos) or `vllm`")
    model: str | None = setting(None, "model to serve (vllm: Hugging Face id or folder); sim: its name")
    served_model_name: str | None = setting(None, "name clients use for the model (default: --model)")
    worker_id: str | None = setting(None, "this worker's id (default: host-pid-random)", flag="--id")
    max_num_seqs: int = setting(64, "requests run at once; the worker pulls only this many", minimum=1)
    metrics_port: int | None = setting(None, "serve Prometheus metrics on this port (default: off)", minimum=0)
    metrics_host: str = setting(
        "127.0.0.1", "address the metrics port listens on (0.0.0.0 in a container, so Prometheus can reach it)"
    )
    worker_heartbeat_s: float = setting(1.0, "registry heartbeat interval", minimum=0.01)
    stream_maxlen: int = setting(100_000, "events kept per request stream while it runs", minimum=1)
    max_unflushed_events: int = setting(4096, "events a request may buffer while Redis is slow", minimum=1)
    lease_timeout_s: float = setting(
        3.0,
        "a running request whose worker stops renewing its lease this long is taken over (at least two "
        "worker heartbeats)",
        minimum=0.1,
    )
    max_attempts: int = setting(3, "attempts before a request that keeps failing workers is dead-lettered", minimum=1)
    drain_timeout_s: float = setting(30.0, "on SIGTERM, how long running requests may take to finish", minimum=0.0)
    sim_ttft_ms: float = setting(50.0, "sim engine: time to first token", minimum=0.0)
    sim_itl_ms: float = setting(20.0, "sim engine: time between tokens", minimum=0.0)
    sim_default_max_tokens: int = setting(
        128, "sim engine: longest natural reply when a request sets no max_tokens", minimum=1
    )
    sim_fail_marker: str = setting(
        "", "sim engine: a prompt containing this text fails after its first token (fault injection for clients)"
    )
    sim_crash_marker: str = setting(
        "", "sim engine: a prompt containing this text kills the worker process mid-request (fault injection)"
    )
    dtype: str = setting("auto", "vllm: weight dtype (auto, float32, bfloat16, float16)")
    max_model_len: int | None = setting(None, "vllm: context length", minimum=1)
    gpu_memory_utilization: float = setting(0.9, "vllm: share of GPU memory for weights and KV cache", minimum=0.01)
    tensor_parallel_size: int = setting(1, "vllm: GPUs per engine", minimum=1)
    enforce_eager: bool = setting(False, "vllm: disable CUDA graphs")
    engine_args_json: str = setting("", "vllm: extra AsyncEngineArgs as a JSON object")
    enable_auto_tool_choice: bool = setting(
        False, "vllm: let the model choose to call tools (`tool_choice: auto`), as `vllm serve` spells it"
    )
    tool_call_parser: str = setting("", "vllm: the tool parser that reads the model's tool calls (e.g. hermes)")
    reasoning_parser: str = setting("", "vllm: the parser that splits reasoning from the reply (e.g. qwen3)")
    chat_template: str = setting("", "vllm: a chat template (a file or the template itself) over the model's own")
    default_chat_template_kwargs: str = setting(
        "", "vllm: chat template variables every request gets unless it sets them, as a JSON object"
    )
    reasoning_config: str = setting(
        "",
        "vllm: the reasoning markers as a JSON object (reasoning_start_str, reasoning_end_str), which a "
        "request's thinking_token_budget needs",
    )
    engine_cpus: str = setting(
        "", "vllm: CPUs the engine's processes are confined to, e.g. `0` or `0-3,8` (default: all)"
    )

    def __post_init__(self) -> None:
        CommonSettings.__post_init__(self)
        parse_cpu_list(self.engine_cpus)
        require_at_least(
            self,
            "lease_timeout_s",
            "worker_heartbeat_s",
            LEASE_HEARTBEATS,
            "a worker renews its leases once per heartbeat and another worker takes over a lease left idle "
            "for lease_timeout_s, so with less, one renewal a little late (a slow Redis round trip, a busy "
            "event loop) hands a live worker's requests to another",
        )
        require_at_least(
            self,
            "worker_ttl_s",
            "worker_heartbeat_s",
            LEASE_HEARTBEATS,
            "a worker refreshes its registry entry once per heartbeat and counts as dead when not heard from "
            "for worker_ttl_s, so with less, one refresh a little late makes a live worker look dead",
        )


def parse_cpu_list(text: str) -> frozenset[int]:
    """``0-3,8`` -> {0, 1, 2, 3, 8}; empty -> empty (no restriction). SettingsError on anything else."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()) or (sep and int(high) < int(low)):
            raise SettingsError(f"TOKENSPOOL_ENGINE_CPUS (--engine-cpus): expected a CPU list like 0-3,8, got {text!r}")
        cpus.update(range(int(low), int(high if sep else low) + 1))
    return frozenset(cpus)
