"""``tokenspool up``: the whole stack in one command, stopped as a whole.

It starts the embedded Redis-compatible server when ``TOKENSPOOL_REDIS_URL`` is unset, then the workers,
then the gateways (several gateways share one listening socket, which the kernel balances), waits until
a gateway answers and a worker has registered, and prints where to go. Children run in their own process
groups so Ctrl-C reaches only this supervisor, which stops gateways first (no new requests), then
workers (they drain), then the server. If any child dies, everything is stopped and the exit is non-zero.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from functools import partial
from types import FrameType

from tokenspool import settings as settings_of
from tokenspool.gateway.settings import GatewaySettings
from tokenspool.redis_server import EmbeddedRedis
from tokenspool.shared.redis_client import RedisTarget, RedisUnreachableError, check_reachable
from tokenspool.stack import Stack, StackError, model_served
from tokenspool.worker.settings import WorkerSettings


def _flag_overrides(args: argparse.Namespace) -> dict[str, str | None]:
    return {
        "host": args.host,
        "port": None if args.port is None else str(args.port),
        "engine": args.engine,
        "model": args.model,
        "allow_open": args.allow_open,
    }


def run_stack(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if args.gateways < 1 or args.workers < 1:
        print("tokenspool up: --gateways and --workers must be at least 1", file=sys.stderr)
        return 2
    env = dict(environ)
    flags = _flag_overrides(args)
    server: EmbeddedRedis | None = None
    if not env.get("TOKENSPOOL_REDIS_URL"):
        env["TOKENSPOOL_REDIS_URL"] = "redis://127.0.0.1:1/0"  # placeholder so settings validate first
    gateway_settings = settings_of.load(GatewaySettings, env, flags)
    worker_settings = settings_of.load(WorkerSettings, env, flags)
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
    stack = Stack(worker_env)  # no log folder: the children's output is this command's own
    workers = [f"worker{index}" for index in range(args.workers)]
    gateways = [f"gateway{index}" for index in range(args.gateways)]
    status = 0
    try:
        for index, name in enumerate(workers):
            stack.start(name, ["worker", "--id", f"{socket.gethostname()}-w{index}"])
        for name in gateways:
            fd = listener.fileno()
            stack.start(name, ["gateway", "--fd", str(fd)], env=gateway_env, pass_fds=(fd,))
        base_url = f"http://{host}:{port}"
        model = worker_settings.model or "tokenspool-sim"
        redis_target = RedisTarget(env["TOKENSPOOL_REDIS_URL"], gateway_settings.redis_tls_ca_file)
        served = worker_settings.served_model_name or model
        stack.wait_ready(
            partial(model_served, base_url, served, redis_target, worker_settings.worker_ttl_s),
            args.ready_timeout_s,
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
            dead = stack.exited()
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
        stack.stop(gateways, 10)  # no new requests first
        listener.close()
        stack.stop(workers, worker_settings.drain_timeout_s + 5)  # then the workers drain
        if server is not None:
            server.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stop_requested and status == 0:
        print("tokenspool up: stopped", flush=True)
    return status
