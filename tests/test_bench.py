"""`tokenspool bench` keeps working: a short smoke of each scenario over real processes, and its bad input.

The figures themselves are not asserted (speed targets live in the benchmark, not in timed tests); what
is asserted is what must hold at any speed: every target answered every request with every token, none
lost or repeated, and the reports carry what the docs quote from them.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.support import clean_env, wait_for


def bench(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenspool", "bench", "--no-progress", *args],
        env=clean_env(None),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def test_latency_scenario_runs_every_target_without_losing_a_token(tmp_path: Path) -> None:
    report = tmp_path / "latency.json"
    plot = tmp_path / "latency.png"
    result = bench(
        *("--levels", "2,4", "--duration-s", "1", "--max-tokens", "12", "--sim-itl-ms", "5"),
        *("--targets", "tokenspool,floor,naive,lean", "--json", str(report), "--png", str(plot)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    document = orjson.loads(report.read_bytes())
    rows = document["rows"]
    assert {(row["target"], row["level"]) for row in rows} == {
        (target, level) for target in ("tokenspool", "floor", "naive", "lean") for level in (2.0, 4.0)
    }
    for row in rows:
        assert row["requests"] > 0, row
        assert row["ok"] == row["requests"], row
        assert row["lost_events"] == 0 and row["duplicated_events"] == 0, row
        assert row["ttft_p50_ms"] > 0 and row["output_tokens_per_s"] > 0, row
    comparisons = {entry["level"]: entry for entry in document["comparisons"]}
    assert set(comparisons) == {2.0, 4.0}
    assert "ttft_added_p50_ms" in comparisons[4.0] and "naive_over_tokenspool_ttft_p50_ms" in comparisons[4.0]
    assert comparisons[4.0]["tokenspool_over_lean_cpu_us_per_request_total"] > 0
    assert comparisons[4.0]["lean_cpu_us_per_request_total_vs_floor"] > 0
    assert set(document["redis_memory"]) == {"tokenspool", "naive", "lean"}
    assert document["redis_memory"]["tokenspool"]["bytes_per_event"] > 0
    tokenspool_run = next(run for run in document["runs"] if run["target"] == "tokenspool")
    assert set(tokenspool_run["cpu_us_per_event"]) == {"redis", "worker", "gateway"}
    assert tokenspool_run["redis_calls_per_event"]["evalsha"] > 0
    lean_run = next(run for run in document["runs"] if run["target"] == "lean")
    assert set(lean_run["cpu_us_per_request"]) == {"redis", "worker", "gateway"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sim engine (simulated: not a language model)" in result.stderr
    assert "tokenspool against the floor" in result.stdout


def test_open_loop_sends_poisson_arrivals_at_the_rate_asked(tmp_path: Path) -> None:
    report = tmp_path / "open.json"
    result = bench(
        *("--mode", "open", "--levels", "20", "--duration-s", "1.5", "--max-tokens", "8", "--sim-itl-ms", "5"),
        *("--targets", "tokenspool", "--json", str(report)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = orjson.loads(report.read_bytes())["rows"]
    assert row["mode"] == "open" and row["errors"] == 0
    assert 10 <= row["requests"] <= 60  # 30 expected; Poisson, fixed seed


def test_relay_and_streams_scenarios_report_the_gateway_against_the_ceiling(tmp_path: Path) -> None:
    relay = tmp_path / "relay.json"
    result = bench(
        *("--scenario", "relay", "--clients", "20", "--max-tokens", "20", "--sim-itl-ms", "5"),
        *("--duration-s", "1", "--json", str(relay)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["target"]: row for row in orjson.loads(relay.read_bytes())["rows"]}
    assert set(rows) == {"ceiling", "tokenspool", "naive"}
    assert rows["ceiling"]["share_of_ceiling"] == pytest.approx(1.0)
    for row in rows.values():
        assert row["ok"] == row["requests"] > 0 and row["lost_events"] == 0, row
        assert row["relay_events_per_core_s"] > 0, row

    streams = tmp_path / "streams.json"
    result = bench("--scenario", "streams", "--streams", "40", "--json", str(streams))
    assert result.returncode == 0, result.stdout + result.stderr
    held = {row["target"]: row for row in orjson.loads(streams.read_bytes())["rows"]}
    assert held["tokenspool"]["streams"] == 40 and held["naive"]["streams"] == 40
    assert held["tokenspool"]["failed_to_open"] == 0 and held["naive"]["failed_to_open"] == 0
    assert held["tokenspool"]["gateway_rss_open_mb"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--levels", "0"], "levels must be positive numbers"),
        (["--levels", "ten"], "expected numbers separated by commas"),
        (["--targets", "tokenspool,vllm"], "targets are a comma-separated subset of tokenspool, floor, naive, lean"),
        (["--server-cpus", "0-4096"], "are not available here"),
        (["--scenario", "relay", "--png", "x.png"], "--png plots the latency scenario"),
        (["--duration", "3"], "unrecognized arguments: --duration"),
    ],
)
def test_bad_bench_arguments_are_refused_with_a_message(args: list[str], message: str) -> None:
    result = bench(*args, timeout_s=30)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("stagger_s", [0.0, 0.4])
def test_a_staggered_closed_loop_starts_its_users_spread_over_the_stagger(tmp_path: Path, stagger_s: float) -> None:
    """``--stagger``: user i of n starts i/n of the stagger after the first, so arrivals are steady; without
    it every user starts within one engine step (then new requests arrive in herds)."""
    import asyncio
    import os

    from tokenspool.bench import targets as tg
    from tokenspool.bench.load import LoadSpec, run_load

    engine = tg.EngineShape(ttft_ms=5, itl_ms=5)
    floor = tg.start_floor(frozenset(os.sched_getaffinity(0)), tmp_path, engine)
    try:  # 4 users, replies of 20 tokens (about 0.1 s); with the stagger they start 0.1 s apart
        spec = LoadSpec("closed", 4, 0.8, 20, engine.model, 0.005, stagger_s=stagger_s)
        records, _ = asyncio.run(run_load(spec, "127.0.0.1", floor.port, floor.path))
    finally:
        floor.stop()
    assert records and all(record.ok for record in records)
    in_flight_at_50ms = sum(1 for r in records if r.started_s <= 0.05 < r.started_s + r.e2e_s)
    assert in_flight_at_50ms == (1 if stagger_s else 4), sorted(r.started_s for r in records)


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    stack = [pid]
    while stack:
        current = stack.pop()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for task in Path(f"/proc/{current}/task").iterdir():
                children = {int(child) for child in (task / "children").read_text().split()}
                stack += children - found
                found |= children
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for an absent parent to collect it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_bench_ended_by_sigterm_stops_the_servers_it_started(tmp_path: Path) -> None:
    """`timeout` and CI limits end a run with SIGTERM; the servers it started must not outlive it."""
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "tokenspool", "bench", "--no-progress", "--targets", "lean,floor"]
    bench_run = subprocess.Popen(
        [*command, "--levels", "2", "--duration-s", "120", "--logs", str(logs)],
        env=clean_env(None),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        # Both targets up: the lean broker's Redis (a launcher and valkey), worker and gateway; the floor.
        servers = wait_for(
            lambda: found if len(found := _descendants(bench_run.pid)) >= 5 else None, 60, "the bench's servers"
        )
        bench_run.send_signal(signal.SIGTERM)
        assert bench_run.wait(timeout=60) != 0
        wait_for(lambda: not any(_running(pid) for pid in servers), 30, "the servers to stop")
    finally:
        bench_run.kill()
        bench_run.wait()
