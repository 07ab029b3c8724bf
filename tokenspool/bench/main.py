"""``tokenspool bench``: load over real HTTP/SSE against tokenspool, the floor and a naive relay, side by side.

Scenarios:

- ``latency`` (default): closed-loop users (``--levels`` concurrent streams) or open-loop Poisson arrivals
  (``--mode open``, ``--levels`` requests/s) against every target in turn, ``--repeat`` times interleaved;
  client-side TTFT, inter-token and end-to-end latency (p50/p90/p99), tokens/s, errors, lost and duplicated
  events, CPU per event of every process, and Redis memory per request and per event. Prints the time to
  first token tokenspool adds over the floor and the naive relay's figures as multiples of tokenspool's, and
  with ``--targets ...,lean`` tokenspool's CPU as a multiple of the lean broker's.
- ``relay``: ``--clients`` concurrent streams through one gateway process that has a CPU of its own:
  events/s, and the gateway's CPU per event against the ceiling (a bare ASGI app writing pre-built events).
- ``streams``: ``--streams`` streams held open at once on one gateway: its memory per open stream.

Everything runs on this machine: servers pinned to ``--server-cpus``, this client to ``--client-cpus``.
The engine is the sim engine (it says so): the benchmark measures the broker, not a model.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from tokenspool.bench import targets as tg
from tokenspool.bench.load import LoadResult, LoadSpec, chat_body, run_load
from tokenspool.bench.report import plot_latency, table
from tokenspool.bench.sse_client import StreamError, open_stream
from tokenspool.shared.settings import SettingsError
from tokenspool.worker.settings import parse_cpu_list

TARGET_NAMES = ("tokenspool", "floor", "naive", "lean")
DEFAULT_TARGETS = ("tokenspool", "floor", "naive")
SUMMED = {"requests", "ok", "errors", "lost_events", "duplicated_events"}


def _levels(text: str) -> list[float]:
    try:
        levels = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not levels or any(level <= 0 for level in levels):
        raise argparse.ArgumentTypeError(f"levels must be positive numbers, got {text!r}")
    return levels


def _cpus(text: str) -> frozenset[int]:
    if text in ("", "all"):
        return frozenset()
    try:
        cpus = parse_cpu_list(text)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    missing = cpus - os.sched_getaffinity(0)
    if missing:
        raise argparse.ArgumentTypeError(f"CPUs {sorted(missing)} are not available here")
    return cpus


def _targets(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in TARGET_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"targets are a comma-separated subset of {', '.join(TARGET_NAMES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenspool bench",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    add = parser.add_argument
    add("--scenario", choices=("latency", "relay", "streams"), default="latency")
    add(
        "--targets",
        type=_targets,
        default=list(DEFAULT_TARGETS),
        help="latency: which targets (default tokenspool,floor,naive; lean: the least a Redis-Streams broker does)",
    )
    add("--mode", choices=("closed", "open"), default="closed", help="latency: closed or open loop")
    add("--levels", type=_levels, default=[10.0, 100.0], help="latency: concurrency or rates (default 10,100)")
    add("--duration-s", type=float, default=10.0, help="seconds of load per run (default 10)")
    add(
        "--stagger",
        action="store_true",
        help="latency, closed loop: start the users spread over one reply's duration (steady arrivals) instead "
        "of all at once (a herd of LEVEL new requests each time the replies end together)",
    )
    add("--repeat", type=int, default=1, help="runs per target and level, interleaved; medians are reported")
    add("--max-tokens", type=int, default=64, help="tokens per reply (default 64; 200 for relay)")
    add("--sim-ttft-ms", type=float, default=20.0, help="sim engine time to first token (default 20)")
    add("--sim-itl-ms", type=float, default=20.0, help="sim engine time per token (default 20: 50 tokens/s)")
    add("--clients", type=int, default=500, help="relay: concurrent streams (default 500)")
    add("--workers", type=int, default=1, help="relay: sim workers feeding the gateway (default 1)")
    add("--streams", type=int, default=2000, help="streams: streams held open at once (default 2000)")
    several = len(os.sched_getaffinity(0)) > 1
    add(
        "--server-cpus",
        type=_cpus,
        default=_cpus(str(min(os.sched_getaffinity(0)))) if several else frozenset(),
        help="CPUs the servers are pinned to (default: the first available)",
    )
    add(
        "--client-cpus",
        type=_cpus,
        default=frozenset(sorted(os.sched_getaffinity(0))[1:]) if several else frozenset(),
        help="CPUs this client is pinned to (default: the others)",
    )
    add("--json", type=Path, default=None, help="write every run and the summary here")
    add("--png", type=Path, default=None, help="latency: plot latency against load here")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--logs", type=Path, default=None, help="keep the servers' logs here (default: a temporary folder)")
    add(
        "--profile",
        type=Path,
        default=None,
        help="latency: sample tokenspool's gateway and worker with py-spy during the last run and write "
        "flame graphs (SVG) and a top-functions summary here",
    )
    return parser


class Progress:
    """A tqdm bar per run, advanced by time, with requests done and errors as its postfix."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    async def track(self, label: str, duration_s: float, work: Any) -> Any:
        if not self.enabled:
            return await work(None)
        from tqdm import tqdm  # type: ignore[import-untyped]

        counts = {"done": 0, "errors": 0}

        def on_record(done: int, errors: int) -> None:
            counts.update(done=done, errors=errors)

        bar = tqdm(total=round(duration_s, 1), desc=label, unit="s", file=sys.stderr, leave=False)
        task = asyncio.ensure_future(work(on_record))
        started = time.monotonic()
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                bar.n = round(min(duration_s, time.monotonic() - started), 1)
                bar.set_postfix(requests=counts["done"], errors=counts["errors"], refresh=False)
                bar.refresh()
            return task.result()
        finally:
            if not task.done():
                task.cancel()
            bar.close()


def _redis_info(url: str, section: str) -> list[dict[str, Any]]:
    """``INFO <section>`` of every primary (of the one server, or of each node of a cluster)."""
    import redis

    from tokenspool.shared.redis_client import RedisTarget, connect_sync

    client: Any = connect_sync(RedisTarget(url))
    try:
        if isinstance(client, redis.RedisCluster):
            primaries = client.get_primaries()  # type: ignore[no-untyped-call]
            return [client.info(section, target_nodes=node) for node in primaries]
        return [client.info(section)]
    finally:
        client.close()


def _redis_used_memory(url: str) -> int:
    return sum(int(info["used_memory"]) for info in _redis_info(url, "memory"))


def _redis_calls(url: str) -> dict[str, int]:
    """Calls per command so far (``INFO commandstats``), to count the Redis work each event costs."""
    calls: dict[str, int] = {}
    for stats in _redis_info(url, "commandstats"):
        for name, value in stats.items():
            command = name.removeprefix("cmdstat_")
            calls[command] = calls.get(command, 0) + int(value["calls"])
    return calls


def _redis_clients(url: str) -> int:
    """Client connections Redis holds now, less the one asking: after a run the pools of tokenspool's
    processes still hold every connection they opened (idle ones are kept), so this is the run's peak."""
    return sum(int(info["connected_clients"]) - 1 for info in _redis_info(url, "clients"))


def _median_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["target"], run["level"]), []).append(run)
    rows = []
    for (target, level), members in groups.items():
        row: dict[str, Any] = {"target": target, "level": level, "mode": members[0]["mode"], "runs": len(members)}
        for key, value in members[0].items():
            if key in row or not isinstance(value, int | float):
                continue
            values = [m[key] for m in members if isinstance(m.get(key), int | float)]
            row[key] = sum(values) if key in SUMMED else statistics.median(values)
        row["cpu_us_per_event_total"] = statistics.median(sum(m.get("cpu_us_per_event", {}).values()) for m in members)
        row["cpu_us_per_request_total"] = statistics.median(
            sum(m.get("cpu_us_per_request", {}).values()) for m in members
        )
        rows.append(row)
    return sorted(rows, key=lambda row: (row["level"], tg.REPORT_ORDER.index(row["target"])))


def _comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per level: what tokenspool adds over the floor, the naive relay as multiples of tokenspool, and
    tokenspool's CPU per request as a multiple of the lean broker's (what the broker adds to the architecture)."""
    out = []
    for level in sorted({row["level"] for row in rows}):
        by = {row["target"]: row for row in rows if row["level"] == level}
        ts = by.get("tokenspool")
        if ts is None:
            continue
        entry: dict[str, Any] = {"level": level}
        floor = by.get("floor")
        if floor is not None:
            for q in (50, 90, 99):
                entry[f"ttft_added_p{q}_ms"] = ts[f"ttft_p{q}_ms"] - floor[f"ttft_p{q}_ms"]
                entry[f"itl_added_p{q}_ms"] = ts[f"itl_p{q}_ms"] - floor[f"itl_p{q}_ms"]
            entry["tokens_per_s_vs_floor"] = _ratio(ts["output_tokens_per_s"], floor["output_tokens_per_s"])
            for key in ("cpu_us_per_event_total", "cpu_us_per_request_total"):
                entry[f"{key}_vs_floor"] = _ratio(ts[key], floor[key])
        naive = by.get("naive")
        if naive is not None:
            for key in ("ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms", "e2e_p99_ms", "cpu_us_per_event_total"):
                entry[f"naive_over_tokenspool_{key}"] = _ratio(naive[key], ts[key])
            entry["tokenspool_over_naive_requests_per_s"] = _ratio(
                ts.get("requests_per_s", math.nan), naive.get("requests_per_s", math.nan)
            )
            entry["naive_over_tokenspool_tokens_per_s"] = _ratio(
                naive["output_tokens_per_s"], ts["output_tokens_per_s"]
            )
        lean = by.get("lean")
        if lean is not None:
            for key in ("cpu_us_per_event_total", "cpu_us_per_request_total"):
                entry[f"tokenspool_over_lean_{key}"] = _ratio(ts[key], lean[key])
                if floor is not None:
                    entry[f"lean_{key}_vs_floor"] = _ratio(lean[key], floor[key])
        out.append(entry)
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


async def _latency(args: argparse.Namespace, log_dir: Path, progress: Progress) -> dict[str, Any]:
    engine = tg.EngineShape(args.sim_ttft_ms, args.sim_itl_ms)
    max_level = int(max(args.levels) * (1 if args.mode == "closed" else 4)) + 64
    started: list[tg.Target] = []
    try:
        for name in args.targets:
            if name == "tokenspool":
                started.append(tg.start_tokenspool(args.server_cpus, log_dir, engine, max_num_seqs=max_level))
            elif name == "floor":
                started.append(tg.start_floor(args.server_cpus, log_dir, engine))
            elif name == "lean":
                started.append(tg.start_lean(args.server_cpus, log_dir, engine))
            else:
                started.append(tg.start_naive(args.server_cpus, log_dir, engine))
        memory_before = {t.name: _redis_used_memory(t.redis_url) for t in started if t.redis_url}
        for target in started:  # warm up: first imports, first connections, the consumer group
            warm = LoadSpec("closed", 4, 0.5, args.max_tokens, engine.model, engine.itl_ms / 1000)
            await run_load(warm, "127.0.0.1", target.port, target.path)
        runs: list[dict[str, Any]] = []
        events_retained = {t.name: 0 for t in started}
        requests_retained = {t.name: 0 for t in started}
        for rep in range(args.repeat):
            for level in args.levels:
                for target in started:
                    step_s = engine.itl_ms / 1000
                    spec = LoadSpec(
                        args.mode,
                        level,
                        args.duration_s,
                        args.max_tokens,
                        engine.model,
                        step_s,
                        stagger_s=engine.ttft_ms / 1000 + args.max_tokens * step_s if args.stagger else 0.0,
                    )
                    cpu_before = target.cpu_s()
                    calls_before = _redis_calls(target.redis_url) if target.redis_url else {}
                    label = f"{target.name} {args.mode} {level:g} (run {rep + 1}/{args.repeat})"

                    def work(on_record: Any, spec: LoadSpec = spec, target: tg.Target = target) -> Any:
                        return run_load(spec, "127.0.0.1", target.port, target.path, on_record)

                    last_run = rep == args.repeat - 1 and level == args.levels[-1]
                    profilers = (
                        _start_profilers(target, args.profile, args.duration_s)
                        if args.profile is not None and target.name == "tokenspool" and last_run
                        else []
                    )
                    records, wall_s = await progress.track(label, args.duration_s, work)
                    _finish_profilers(profilers)
                    cpu_after = target.cpu_s()
                    result = LoadResult(target.name, spec, records, wall_s)
                    result.cpu_s = {role: cpu_after[role] - cpu_before.get(role, 0.0) for role in cpu_after}
                    summary = result.summary()
                    summary["run"] = rep + 1
                    if target.redis_url and summary["events_per_s"]:
                        events = summary["events_per_s"] * wall_s
                        calls = _redis_calls(target.redis_url)
                        per_event = {k: (v - calls_before.get(k, 0)) / events for k, v in calls.items()}
                        summary["redis_calls_per_event"] = {k: v for k, v in per_event.items() if v >= 0.001}
                        summary["redis_clients"] = _redis_clients(target.redis_url)
                    if summary["requests"]:
                        summary["requests_per_s"] = summary["requests"] / wall_s
                        summary["cpu_us_per_request"] = {
                            role: cpu / summary["requests"] * 1e6 for role, cpu in result.cpu_s.items()
                        }
                    runs.append(summary)
                    events_retained[target.name] += sum(r.events for r in records)
                    requests_retained[target.name] += len(records)
                    print(_run_line(summary), file=sys.stderr)
        redis_memory = {}
        for target in started:
            if target.redis_url and requests_retained[target.name]:
                grown = _redis_used_memory(target.redis_url) - memory_before[target.name]
                redis_memory[target.name] = {
                    "requests_retained": requests_retained[target.name],
                    "bytes_per_request": grown / requests_retained[target.name],
                    "bytes_per_event": grown / max(1, events_retained[target.name]),
                }
    finally:
        for target in started:
            target.stop()
    rows = _median_rows(runs)
    return {"runs": runs, "rows": rows, "comparisons": _comparisons(rows), "redis_memory": redis_memory}


def _start_profilers(target: tg.Target, out_dir: Path, duration_s: float) -> list[tuple[Path, Any]]:
    """py-spy on the gateway and the worker for one run: a flame graph each, plus raw stacks to summarise."""
    import shutil
    import subprocess

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = []
    for role in ("gateway", "worker"):
        for fmt, suffix in (("flamegraph", "svg"), ("raw", "txt")):
            path = out_dir / f"{role}.{suffix}"
            argv = [py_spy, "record", "--pid", str(target.pid(role)), "--duration", str(max(1, int(duration_s)))]
            argv += ["--rate", "200", "--nonblocking", "--format", fmt, "--output", str(path)]
            started.append((path, subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    return started


def _finish_profilers(profilers: list[tuple[Path, Any]]) -> None:
    for path, proc in profilers:
        _out, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            print(f"py-spy could not profile ({path.stem}): {err.decode(errors='replace')[-300:]}", file=sys.stderr)
        elif path.suffix == ".txt":
            summary = path.with_name(path.stem + "-top.txt")
            summary.write_text(top_functions(path.read_text()))
            print(f"profile: {path.with_suffix('.svg')} and {summary}", file=sys.stderr)


def top_functions(raw: str, count: int = 25) -> str:
    """Self and inclusive shares of py-spy's raw stacks ("frame;frame;... samples" per line)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, samples_text = line.rpartition(" ")
        if not stack or not samples_text.isdigit():
            continue
        samples = int(samples_text)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
    lines = [f"{total} samples (wall-clock, threads not idle: a thread waiting for a CPU counts too)", "", "self:"]
    for name, value in sorted(own.items(), key=lambda kv: -kv[1])[:count]:
        lines.append(f"  {value / total:6.1%}  {name}")
    lines += ["", "inclusive:"]
    for name, value in sorted(inclusive.items(), key=lambda kv: -kv[1])[:count]:
        lines.append(f"  {value / total:6.1%}  {name}")
    return "\n".join(lines) + "\n"


def _run_line(s: dict[str, Any]) -> str:
    return (
        f"  {s['target']:>10} {s['mode']} {s['level']:g}: {s['requests']} requests, {s['errors']} errors, "
        f"TTFT p50 {s['ttft_p50_ms']:.1f} ms p99 {s['ttft_p99_ms']:.1f} ms, {s['events_per_s']:,.0f} events/s, "
        f"CPU µs/event {_cpu_line(s.get('cpu_us_per_event', {}))}, "
        f"CPU µs/request {_cpu_line(s.get('cpu_us_per_request', {}))}"
        + (f", Redis clients {s['redis_clients']}" if "redis_clients" in s else "")
    )


def _cpu_line(by_role: dict[str, float]) -> str:
    parts = " ".join(f"{role} {value:,.0f}" for role, value in sorted(by_role.items()))
    return f"{sum(by_role.values()):,.0f} ({parts})" if by_role else "-"


async def _relay(args: argparse.Namespace, log_dir: Path, progress: Progress) -> dict[str, Any]:
    """Each target's relaying process on ``--server-cpus`` alone; everything else on the client's CPUs."""
    engine = tg.EngineShape(0.0, args.sim_itl_ms)
    results = []
    builders = {
        "ceiling": lambda: tg.start_ceiling(args.server_cpus, log_dir, args.max_tokens),
        "tokenspool": lambda: tg.start_tokenspool(
            args.server_cpus,
            log_dir,
            engine,
            max_num_seqs=args.clients + 16,
            workers=args.workers,
            support_cpus=args.client_cpus,
        ),
        "naive": lambda: tg.start_naive(args.server_cpus, log_dir, engine, support_cpus=args.client_cpus),
    }
    for name in ("ceiling", "tokenspool", "naive"):
        if name != "ceiling" and name not in args.targets:
            continue
        target = builders[name]()
        relay_role = "server" if name == "ceiling" else "gateway"
        try:
            warm = LoadSpec("closed", 8, 0.5, args.max_tokens, engine.model, 0.0)
            await run_load(warm, "127.0.0.1", target.port, target.path)
            spec = LoadSpec(
                "closed", args.clients, args.duration_s, args.max_tokens, engine.model, engine.itl_ms / 1000
            )
            cpu_before = target.cpu_s()

            def work(on_record: Any, spec: LoadSpec = spec, target: tg.Target = target) -> Any:
                return run_load(spec, "127.0.0.1", target.port, target.path, on_record)

            records, wall_s = await progress.track(f"relay {name} x{args.clients}", args.duration_s, work)
            cpu_after = target.cpu_s()
        finally:
            target.stop()
        result = LoadResult(name, spec, records, wall_s)
        result.cpu_s = {role: cpu_after[role] - cpu_before.get(role, 0.0) for role in cpu_after}
        summary = result.summary()
        events = sum(r.events for r in records)
        relay_cpu = result.cpu_s[relay_role]
        summary["relay_cpu_s"] = relay_cpu
        summary["relay_cpu_share_of_wall"] = relay_cpu / wall_s if wall_s else float("nan")
        summary["relay_us_per_event"] = relay_cpu / events * 1e6 if events else float("nan")
        summary["relay_events_per_core_s"] = events / relay_cpu if relay_cpu else float("nan")
        results.append(summary)
        print(_run_line(summary), file=sys.stderr)
    ceiling = next(r for r in results if r["target"] == "ceiling")
    for row in results:
        row["share_of_ceiling"] = _ratio(row["relay_events_per_core_s"], ceiling["relay_events_per_core_s"])
    return {"rows": results}


async def _streams(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Hold ``--streams`` streams open at once; the relaying process's memory per open stream."""
    engine = tg.EngineShape(0.0, 1000.0)
    rows = []
    for name in ("tokenspool", "naive"):
        if name not in args.targets:
            continue
        if name == "tokenspool":
            target = tg.start_tokenspool(
                args.server_cpus, log_dir, engine, max_num_seqs=args.streams + 16, support_cpus=args.client_cpus
            )
        else:
            target = tg.start_naive(args.server_cpus, log_dir, engine, support_cpus=args.client_cpus)
        writers: list[asyncio.StreamWriter] = []
        try:
            warm = await _hold_streams(target, engine.model, 0, 8)
            for writer in warm:
                writer.close()
            await asyncio.sleep(1.0)
            idle_rss = tg.rss_bytes(target.pid("gateway"))
            redis_before = _redis_used_memory(target.redis_url)
            opened_at = time.perf_counter()
            # Half, then all: the second half's growth is the marginal cost of a stream, without the one-off
            # growth the first opens cause (connection pools, allocator arenas).
            half = args.streams // 2
            failures: list[str] = []
            writers = await _hold_streams(target, engine.model, 1000, half, failures)
            await asyncio.sleep(2.0)  # a few token steps with every stream open
            half_rss = tg.rss_bytes(target.pid("gateway"))
            writers += await _hold_streams(target, engine.model, 1000 + half, args.streams - half, failures)
            open_s = time.perf_counter() - opened_at
            await asyncio.sleep(2.0)
            open_rss = tg.rss_bytes(target.pid("gateway"))
            redis_open = _redis_used_memory(target.redis_url)
            rows.append(
                {
                    "target": name,
                    "streams": len(writers),
                    "failed_to_open": len(failures),
                    "first_failures": sorted(set(failures))[:3],
                    "seconds_to_open_all": open_s,
                    "gateway_rss_idle_mb": idle_rss / 2**20,
                    "gateway_rss_open_mb": open_rss / 2**20,
                    "gateway_bytes_per_open_stream": (open_rss - idle_rss) / len(writers),
                    "gateway_marginal_bytes_per_stream": (open_rss - half_rss) / max(1, len(writers) - half),
                    "redis_bytes_per_open_stream": (redis_open - redis_before) / len(writers),
                }
            )
            print(
                f"  {name}: {len(writers)} streams open, {rows[-1]['gateway_bytes_per_open_stream']:,.0f} B each",
                file=sys.stderr,
            )
        finally:
            for writer in writers:
                writer.close()
            target.stop()
    return {"rows": rows}


async def _hold_streams(
    target: tg.Target, model: str, first: int, count: int, failures: list[str] | None = None
) -> list[asyncio.StreamWriter]:
    """Open ``count`` long streams (64 connecting at a time) and keep them open; the caller closes them.
    A stream that fails to open is recorded in ``failures`` (or raises, without a list to record it in)."""
    semaphore = asyncio.Semaphore(64)
    writers: list[asyncio.StreamWriter] = []

    async def hold(index: int) -> None:
        async with semaphore:
            body = chat_body(model, first + index, 1000)
            try:
                writers.append(await open_stream("127.0.0.1", target.port, target.path, body, 120))
            except (OSError, TimeoutError, asyncio.IncompleteReadError, StreamError) as exc:
                if failures is None:
                    raise
                failures.append(f"{type(exc).__name__}: {exc}"[:200])

    try:
        await asyncio.gather(*(hold(i) for i in range(count)))
    except BaseException:
        for writer in writers:
            writer.close()
        raise
    return writers


LATENCY_COLUMNS = [
    ("target", "target"),
    ("level", "level"),
    ("requests", "requests"),
    ("errors", "errors"),
    ("lost_events", "lost"),
    ("duplicated_events", "dup"),
    ("ttft_p50_ms", "TTFT p50"),
    ("ttft_p90_ms", "p90"),
    ("ttft_p99_ms", "p99"),
    ("itl_p50_ms", "ITL p50"),
    ("itl_p99_ms", "p99"),
    ("e2e_p50_ms", "e2e p50"),
    ("e2e_p99_ms", "p99"),
    ("output_tokens_per_s", "tokens/s"),
    ("cpu_us_per_event_total", "CPU µs/event"),
    ("cpu_us_per_request_total", "CPU µs/request"),
    ("redis_clients", "Redis clients"),
]


def print_latency(result: dict[str, Any], args: argparse.Namespace) -> None:
    unit = "concurrent streams" if args.mode == "closed" else "requests/s"
    start = ", users started spread over one reply (--stagger)" if args.stagger and args.mode == "closed" else ""
    print(f"\nlatency, {args.mode} loop (level = {unit}{start}), milliseconds; medians of {args.repeat} run(s):")
    print(table(result["rows"], LATENCY_COLUMNS))
    if result["comparisons"]:
        print("\ntokenspool against the floor (added ms), the naive relay (naive ÷ tokenspool) and the lean broker:")
        columns = [("level", "level")]
        keys = sorted({key for entry in result["comparisons"] for key in entry if key != "level"})
        columns += [(key, key.replace("naive_over_tokenspool_", "naive/ts ")) for key in keys]
        for entry in result["comparisons"]:
            print(f"  level {entry['level']:g}:")
            for key, heading in columns[1:]:
                if key in entry:
                    print(f"    {heading:<46} {entry[key]:.3f}")
    for name, memory in result["redis_memory"].items():
        print(
            f"\nRedis memory, {name}: {memory['bytes_per_request']:,.0f} B per retained request, "
            f"{memory['bytes_per_event']:.1f} B per event ({memory['requests_retained']} requests retained)"
        )


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.duration_s <= 0 or args.repeat < 1 or args.max_tokens < 1 or args.clients < 1 or args.streams < 1:
        parser.error("--duration-s, --repeat, --max-tokens, --clients and --streams must be positive")
    if args.sim_ttft_ms < 0 or args.sim_itl_ms < 0:
        parser.error("--sim-ttft-ms and --sim-itl-ms must not be negative")
    if args.png is not None and args.scenario != "latency":
        parser.error("--png plots the latency scenario")
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)
    progress = Progress(enabled=not args.no_progress)
    print(
        f"tokenspool bench {args.scenario}: sim engine (simulated: not a language model), "
        f"servers on CPUs {sorted(args.server_cpus) or 'all'}, client on {sorted(args.client_cpus) or 'all'}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="tokenspool-bench-") as tmp:
        log_dir = args.logs or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        import uvloop

        if args.scenario == "latency":
            result = uvloop.run(_latency(args, log_dir, progress))
            print_latency(result, args)
            if args.png is not None:
                plot_latency(result["rows"], args.png, f"tokenspool bench: {args.mode} loop, sim engine")
                print(f"\nplot: {args.png}")
        elif args.scenario == "relay":
            result = uvloop.run(_relay(args, log_dir, progress))
            print(f"\nrelay: {args.clients} concurrent streams, the relaying process alone on its CPU:")
            print(
                table(
                    result["rows"],
                    [
                        ("target", "target"),
                        ("events_per_s", "events/s"),
                        ("relay_cpu_share_of_wall", "relay CPU busy"),
                        ("relay_us_per_event", "relay CPU µs/event"),
                        ("relay_events_per_core_s", "events/s per core"),
                        ("share_of_ceiling", "share of ceiling"),
                        ("errors", "errors"),
                        ("lost_events", "lost"),
                        ("duplicated_events", "dup"),
                    ],
                )
            )
        else:
            result = uvloop.run(_streams(args, log_dir))
            print("\nstreams held open at once (sim engine, one token per second):")
            print(
                table(
                    result["rows"],
                    [
                        ("target", "target"),
                        ("streams", "streams"),
                        ("failed_to_open", "failed"),
                        ("seconds_to_open_all", "s to open"),
                        ("gateway_rss_idle_mb", "gateway RSS idle MB"),
                        ("gateway_rss_open_mb", "open MB"),
                        ("gateway_bytes_per_open_stream", "gateway B/stream"),
                        ("gateway_marginal_bytes_per_stream", "marginal B/stream"),
                        ("redis_bytes_per_open_stream", "Redis B/stream"),
                    ],
                )
            )
    if args.json is not None:
        document = {"scenario": args.scenario, "settings": _jsonable(vars(args)), **result}
        args.json.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        print(f"json: {args.json}")
    return 0


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, frozenset | set):
            value = sorted(value)
        elif isinstance(value, Path):
            value = str(value)
        out[key] = value
    return out
