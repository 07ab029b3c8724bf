"""The servers a benchmark runs against, each a set of real processes pinned to the server CPUs.

Every target answers ``POST /v1/chat/completions`` with an SSE stream of OpenAI chunks whose ids count up
(``id: <request>:<n>``), so one client measures them all the same way. Each process's CPU time is read
from ``/proc`` (its threads and children included) before and after a run: CPU per event is the figure that
survives a noisy machine, and the one the capacity model is built from.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from tokenspool.redis_server import free_port
from tokenspool.shared.redis_client import RedisTarget
from tokenspool.stack import Stack, StackError, child_env, http_ok, model_listed, redis_answers

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REPORT_ORDER = ("floor", "tokenspool", "lean", "naive", "ceiling")  # the order tables and plots list targets in


@dataclass(frozen=True, slots=True)
class EngineShape:
    """The sim engine every target runs: the same replies at the same pace."""

    ttft_ms: float
    itl_ms: float
    model: str = "bench-sim"

    def flags(self) -> list[str]:
        return ["--sim-ttft-ms", str(self.ttft_ms), "--sim-itl-ms", str(self.itl_ms)]


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants, live ones only."""
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            fields = stat.rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Target:
    """One system under test: named processes (a :class:`~tokenspool.stack.Stack`, logs named
    ``<target>-<role>.log``), the port clients use, and how to tell it is ready."""

    name: str
    cpus: frozenset[int]
    log_dir: Path
    port: int = 0
    path: str = "/v1/chat/completions"
    redis_url: str = ""
    stack: Stack = field(init=False)

    def __post_init__(self) -> None:
        env = {**child_env(os.environ), "TOKENSPOOL_LOG_LEVEL": "warning"}
        self.stack = Stack(env, self.log_dir, log_prefix=f"{self.name}-", stop_timeout_s=10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(
        self,
        role: str,
        module: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        cpus: frozenset[int] | None = None,
    ) -> None:
        """Start ``python -m <module> <argv>`` as ``role``, pinned to ``cpus`` (default: the target's own)."""
        self.stack.start(role, argv, env=env, module=module, cpus=self.cpus if cpus is None else cpus)

    def wait_ready(self, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
        try:
            self.stack.wait_ready(check, timeout_s, self.name)
        except StackError as exc:
            raise RuntimeError(f"{exc} (logs in {self.log_dir})") from None

    def cpu_s(self) -> dict[str, float]:
        return {role: tree_cpu_s(proc.pid) for role, proc in self.stack.processes.items()}

    def pid(self, role: str) -> int:
        return self.stack[role].pid

    def stop(self) -> None:
        self.stack.close()


@contextlib.contextmanager
def _starting(target: Target) -> Iterator[Target]:
    """Stop what was started of ``target`` when starting it fails or is interrupted (Ctrl-C, SIGTERM):
    the caller never got it, so nothing else would."""
    try:
        yield target
    except BaseException:
        target.stop()
        raise


def _redis(target: Target, cpus: frozenset[int] | None) -> str:
    port = free_port()
    target.spawn("redis", "tokenspool", ["redis", "--port", str(port)], cpus=cpus)
    url = target.redis_url = f"redis://127.0.0.1:{port}/0"
    target.wait_ready(partial(redis_answers, RedisTarget(url)))
    return url


def start_tokenspool(
    cpus: frozenset[int],
    log_dir: Path,
    engine: EngineShape,
    *,
    max_num_seqs: int,
    workers: int = 1,
    support_cpus: frozenset[int] | None = None,
) -> Target:
    """Embedded Valkey, ``workers`` sim workers and one gateway: the broker's whole data path.

    The gateway runs on ``cpus``; Redis and the workers on ``support_cpus`` when given (the relay scenario
    gives the gateway a core of its own), else on ``cpus`` too."""
    with _starting(Target("tokenspool", cpus, log_dir, port=free_port())) as target:
        url = _redis(target, support_cpus)
        for index in range(workers):
            target.spawn(
                f"worker{index}" if workers > 1 else "worker",
                "tokenspool",
                [
                    "worker",
                    "--model",
                    engine.model,
                    "--max-num-seqs",
                    str(max_num_seqs),
                    *engine.flags(),
                ],
                {"TOKENSPOOL_REDIS_URL": url},
                cpus=support_cpus,
            )
        target.spawn(
            "gateway",
            "tokenspool",
            ["gateway", "--port", str(target.port), "--host", "127.0.0.1"],
            {"TOKENSPOOL_REDIS_URL": url},
        )
        target.wait_ready(partial(model_listed, target.base_url, engine.model))
        return target


def start_floor(cpus: frozenset[int], log_dir: Path, engine: EngineShape) -> Target:
    """The sim engine served from the one process that runs it."""
    with _starting(Target("floor", cpus, log_dir, port=free_port())) as target:
        target.spawn("server", "tokenspool.bench.floor", ["--port", str(target.port), *engine.flags()])
        target.wait_ready(partial(http_ok, target.base_url + "/healthz"))
        return target


def start_naive(
    cpus: frozenset[int], log_dir: Path, engine: EngineShape, *, support_cpus: frozenset[int] | None = None
) -> Target:
    """The naive relay: a blocking XREAD per client, JSON entries, one XADD per token."""
    with _starting(Target("naive", cpus, log_dir, port=free_port())) as target:
        url = _redis(target, support_cpus)
        target.spawn(
            "worker", "tokenspool.bench.naive", ["worker", "--redis-url", url, *engine.flags()], cpus=support_cpus
        )
        target.spawn("gateway", "tokenspool.bench.naive", ["gateway", "--redis-url", url, "--port", str(target.port)])
        target.wait_ready(partial(http_ok, target.base_url + "/healthz"))
        return target


def start_lean(cpus: frozenset[int], log_dir: Path, engine: EngineShape) -> Target:
    """The lean broker: one XADD to enqueue, one multiplexed XREAD, no record, resume or fencing."""
    with _starting(Target("lean", cpus, log_dir, port=free_port())) as target:
        url = _redis(target, None)
        target.spawn("worker", "tokenspool.bench.lean", ["worker", "--redis-url", url, *engine.flags()])
        target.spawn("gateway", "tokenspool.bench.lean", ["gateway", "--redis-url", url, "--port", str(target.port)])
        target.wait_ready(partial(http_ok, target.base_url + "/healthz"))
        return target


def start_ceiling(cpus: frozenset[int], log_dir: Path, max_events: int) -> Target:
    """The bare ASGI app writing pre-built events (no Redis): the ceiling of a Python relay here."""
    with _starting(Target("ceiling", cpus, log_dir, port=free_port())) as target:
        target.spawn(
            "server", "tokenspool.bench.ceiling", ["--port", str(target.port), "--max-events", str(max_events)]
        )
        target.wait_ready(partial(http_ok, target.base_url + "/healthz"))
        return target
