"""``tokenspool up``: the whole stack in one command, stopped as a whole.

It starts the embedded Redis-compatible server when ``TOKENSPOOL_REDIS_URL`` is unset, then the workers,
then the gateways (several gateways share one listening socket, which the kernel balances), waits until
a gateway answers and a worker has registered, and prints where to go. Children run in their own process
groups so Ctrl-C reaches only this supervisor, which stops gateways first (no new requests), then
workers (they drain), then the server. If any child dies, everything is stopped and the exit is non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from types import FrameType

import redis

from shared import keys, registry, wire
from shared.redis_client import RedisTarget, RedisUnreachableError, check_reachable
from shared.settings import GatewaySettings, WorkerSettings, load_settings
from tokenspool.redis_server import EmbeddedRedis


class StackError(RuntimeError):
    """The stack could not start: a process exited, or it was not ready in time."""


def _flag_overrides(args: argparse.Namespace) -> dict[str, str | None]:
    return {
        "host": args.host,
        "port": None if args.port is None else str(args.port),
        "engine": args.engine,
        "model": args.model,
        "allow_open": args.allow_open,
    }


def _spawn(argv: list[str], env: Mapping[str, str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokenspool", *argv],
        env=dict(env),
        pass_fds=pass_fds,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.load(response)


def _model_registered(redis_url: str, model: str, ttl_s: float) -> bool:
    """Whether a live worker serves ``model``, read from the registry itself (for gateways that need a key)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    try:
        raw: dict[bytes, bytes] = client.hgetall(keys.workers_key())  # type: ignore[assignment]
    finally:
        client.close()
    now = int(time.time() * 1000)
    for payload in raw.values():
        with contextlib.suppress(wire.WireError):
            info = wire.decode(payload, wire.WorkerInfo)
            if info.model == model and registry.is_live(info, now, ttl_s):
                return True
    return False


def _wait_ready(
    base_url: str, model: str, children: list[subprocess.Popen[bytes]], timeout_s: float, redis_url: str, ttl_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in children:
            if child.poll() is not None:
                raise StackError(f"a process exited during start-up (exit code {child.returncode}); see its log above")
        try:
            models = _get_json(f"{base_url}/v1/models")
            if isinstance(models, dict) and any(m.get("id") == model for m in models.get("data", [])):
                return
        except urllib.error.HTTPError as exc:
            # 401: the gateways require API keys (the supervisor holds only their hashes): the gateway
            # answers, so ask the registry whether the model is served.
            if exc.code == 401 and _model_registered(redis_url, model, ttl_s):
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass  # not answering yet
        time.sleep(0.2)
    raise StackError(f"the stack was not ready within {timeout_s:.0f}s")


def _stop(children: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run_stack(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if args.gateways < 1 or args.workers < 1:
        print("tokenspool up: --gateways and --workers must be at least 1", file=sys.stderr)
        return 2
    env = dict(environ)
    flags = _flag_overrides(args)
    server: EmbeddedRedis | None = None
    if not env.get("TOKENSPOOL_REDIS_URL"):
        env["TOKENSPOOL_REDIS_URL"] = "redis://127.0.0.1:1/0"  # placeholder so settings validate first
    gateway_settings = load_settings(GatewaySettings, env, flags)
    worker_settings = load_settings(WorkerSettings, env, flags)
    if worker_settings.engine == "vllm" and not worker_settings.model:
        print("tokenspool up: --model is required with --engine vllm", file=sys.stderr)
        return 2
    if not environ.get("TOKENSPOOL_REDIS_URL"):
        server = EmbeddedRedis().start()
        env["TOKENSPOOL_REDIS_URL"] = server.url
    else:
        try:
            check_reachable(RedisTarget.of(gateway_settings))
        except RedisUnreachableError as exc:
            print(f"tokenspool up: {exc}", file=sys.stderr)
            return 2
    for name, value in flags.items():
        if value is not None:
            env[f"TOKENSPOOL_{name.upper()}"] = value

    stop_requested = False

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    # Gateways behind one port pool their metrics, so a scrape reaching any of them reports all of them.
    metrics_dir = tempfile.mkdtemp(prefix="tokenspool-gateway-metrics-")
    gateway_env = {**env, "TOKENSPOOL_METRICS_MULTIPROC_DIR": metrics_dir}
    # Workers never see the API keys: only gateways check them.
    worker_env = {k: v for k, v in env.items() if k not in ("TOKENSPOOL_API_KEYS", "TOKENSPOOL_API_KEYS_FILE")}
    listener = socket.create_server((gateway_settings.host, gateway_settings.port), backlog=2048, reuse_port=False)
    listener.set_inheritable(True)
    host, port = listener.getsockname()[:2]
    workers: list[subprocess.Popen[bytes]] = []
    gateways: list[subprocess.Popen[bytes]] = []
    status = 0
    try:
        for index in range(args.workers):
            workers.append(_spawn(["worker", "--id", f"{socket.gethostname()}-w{index}"], worker_env))
        for _ in range(args.gateways):
            gateways.append(_spawn(["gateway", "--fd", str(listener.fileno())], gateway_env, (listener.fileno(),)))
        base_url = f"http://{host}:{port}"
        model = worker_settings.model or "tokenspool-sim"
        _wait_ready(
            base_url,
            worker_settings.served_model_name or model,
            [*workers, *gateways],
            args.ready_timeout_s,
            env["TOKENSPOOL_REDIS_URL"],
            worker_settings.worker_ttl_s,
        )
        key_header = (
            ' -H "Authorization: Bearer $YOUR_KEY"'
            if gateway_settings.api_keys or gateway_settings.api_keys_file
            else ""
        )
        engine_note = (
            " (SIMULATED engine: filler words, for trying the broker)" if worker_settings.engine == "sim" else ""
        )
        print(
            f"\ntokenspool is up at {base_url}: {args.gateways} gateway(s), {args.workers} worker(s), "
            f"model {model!r}{engine_note}\nRedis: {env['TOKENSPOOL_REDIS_URL']}\n\nTry:\n"
            f"  curl -N {base_url}/v1/chat/completions{key_header} -H 'Content-Type: application/json' \\\n"
            f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], '
            f'"stream": true}}\'\n\nCtrl-C stops everything.',
            flush=True,
        )
        while not stop_requested:
            dead = [child for child in (*workers, *gateways) if child.poll() is not None]
            if dead:
                print(
                    f"tokenspool up: a process exited unexpectedly (exit code {dead[0].returncode}); stopping",
                    file=sys.stderr,
                )
                status = 1
                break
            time.sleep(0.2)
    except StackError as exc:
        print(f"tokenspool up: {exc}", file=sys.stderr)
        status = 1
    finally:
        _stop(gateways, 10)
        listener.close()
        _stop(workers, worker_settings.drain_timeout_s + 5)
        if server is not None:
            server.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stop_requested and status == 0:
        print("tokenspool up: stopped", flush=True)
    return status
