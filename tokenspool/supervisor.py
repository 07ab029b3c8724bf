"""``tokenspool up``: the whole stack in one command, kept running, stopped as a whole.

It starts the embedded Redis-compatible server when ``TOKENSPOOL_REDIS_URL`` is unset (with its append-only
file, so that it can come back with its data), then the workers, then the gateways (several gateways share
one listening socket, which this process holds and passes to each by file descriptor), waits until a gateway
answers and a worker serves the model, and prints where to go.

Then it supervises. A process that exits is logged and started again, as it was started, after a delay
that doubles with each quick death (:class:`RestartPolicy`: 0.5 s up to 30 s, back to 0.5 s after a run of
a minute), so one crash costs half a second and a crash loop does not spin. The stack survives the death
of any one process: the shared socket stays open here, so clients keep connecting to the surviving
gateways and resume (``Last-Event-ID``) where they were; a worker's requests are taken over from Redis by
the next worker to renew its leases (the restarted one included); the server comes back on its port with
what it had acknowledged, and gateways and workers reconnect. Two exits are not failures: a worker that
exits 0 was drained by an operator (``tokenspool drain``) and stays stopped, and nothing is restarted once
a stop was asked for. A process that dies before the stack is first ready fails ``up`` (a mistake in the
settings would otherwise restart forever).

Children run in their own process groups so Ctrl-C reaches only this supervisor, which stops gateways
first (no new requests), then workers (they drain), then the server.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from types import FrameType

from tokenspool import settings as settings_of
from tokenspool.gateway.metrics import forget_process
from tokenspool.gateway.settings import GatewaySettings
from tokenspool.redis_server import EmbeddedRedis, EmbeddedServerError
from tokenspool.shared.ports import PortUnavailableError, listen
from tokenspool.shared.redis_client import RedisTarget, RedisUnreachableError, check_reachable
from tokenspool.shared.settings import env_name
from tokenspool.stack import Stack, StackError, model_served
from tokenspool.worker.settings import WorkerSettings

POLL_INTERVAL_S = 0.1


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How long to wait before starting an exited process again.

    The first restart waits ``first_delay_s``; each further one doubles the wait, up to ``max_delay_s``,
    unless the process had run for ``healthy_after_s`` (then it starts from ``first_delay_s`` again).
    """

    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    healthy_after_s: float = 60.0

    def delay_s(self, previous_delay_s: float | None, ran_s: float) -> float:
        if previous_delay_s is None or ran_s >= self.healthy_after_s:
            return self.first_delay_s
        return min(previous_delay_s * 2, self.max_delay_s)


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` / ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass(slots=True)
class Supervised:
    """One process ``up`` keeps running: how to see that it exited, how to start it again, and whether an
    exit with code 0 means it was stopped on purpose."""

    name: str
    pid: Callable[[], int | None]
    returncode: Callable[[], int | None]
    start_again: Callable[[], None]
    clean_exit_is_final: bool = False
    after_exit: Callable[[int], None] | None = None
    """Called with the pid of the process that exited, before it is started again."""
    started_at: float = 0.0
    delay_s: float | None = None
    restart_at: float | None = None
    finished: bool = False


class Supervisor:
    """Restarts the processes it watches when they exit, with :class:`RestartPolicy`, and says so on
    ``say`` (this command's standard error)."""

    def __init__(
        self,
        children: Iterable[Supervised],
        policy: RestartPolicy | None = None,
        *,
        say: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = list(children)
        self.policy = policy or RestartPolicy()
        self._say = say or (lambda line: print(f"tokenspool up: {line}", file=sys.stderr, flush=True))
        self._clock = clock
        now = clock()
        for child in self.children:
            child.started_at = now

    def check(self) -> None:
        """Notice exits and run the restarts that are due; called every :data:`POLL_INTERVAL_S`."""
        now = self._clock()
        for child in self.children:
            if child.finished:
                continue
            if child.restart_at is None:
                returncode = child.returncode()
                if returncode is None:
                    continue
                self._exited(child, returncode, now)
            elif now >= child.restart_at:
                self._restart(child, now)

    def _exited(self, child: Supervised, returncode: int, now: float) -> None:
        pid = child.pid()
        ran_s = now - child.started_at
        if child.after_exit is not None and pid is not None:
            child.after_exit(pid)
        what = f"{child.name} (pid {pid}) {describe_exit(returncode)} after {ran_s:.1f}s"
        if returncode == 0 and child.clean_exit_is_final:
            child.finished = True
            self._say(f"{what} (drained); not restarting it")
            return
        child.delay_s = self.policy.delay_s(child.delay_s, ran_s)
        child.restart_at = now + child.delay_s
        self._say(f"{what}; restarting it in {child.delay_s:.1f}s")

    def _restart(self, child: Supervised, now: float) -> None:
        child.restart_at = None
        child.started_at = now
        try:
            child.start_again()
        except (OSError, EmbeddedServerError) as exc:
            self._say(f"could not restart {child.name}: {exc}")
            child.delay_s = self.policy.delay_s(child.delay_s, 0.0)
            child.restart_at = self._clock() + child.delay_s
            return
        self._say(f"restarted {child.name} (pid {child.pid()})")


def _setting_flags(args: argparse.Namespace) -> dict[str, str | None]:
    """The gateway and worker settings given as flags of ``up`` (field name -> raw text)."""
    names = {f.name for cls in (GatewaySettings, WorkerSettings) for f in dataclasses.fields(cls)}
    return {name: getattr(args, name, None) for name in sorted(names - settings_of.SET_BY_UP)}


def run_stack(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if args.gateways < 1 or args.workers < 1:
        print("tokenspool up: --gateways and --workers must be at least 1", file=sys.stderr)
        return 2
    env = dict(environ)
    flags = _setting_flags(args)
    given_url = flags.get("redis_url") or environ.get("TOKENSPOOL_REDIS_URL")
    server: EmbeddedRedis | None = None
    if not given_url:
        env["TOKENSPOOL_REDIS_URL"] = "redis://127.0.0.1:1/0"  # placeholder so settings validate first
    gateway_settings = settings_of.load(GatewaySettings, env, flags)
    worker_settings = settings_of.load(WorkerSettings, env, flags)
    if worker_settings.engine == "vllm" and not worker_settings.model:
        print("tokenspool up: --model is required with --engine vllm", file=sys.stderr)
        return 2
    try:
        listener = listen(
            gateway_settings.host, gateway_settings.port, what="the gateway port", setting="TOKENSPOOL_PORT, --port"
        )
    except PortUnavailableError as exc:
        print(f"tokenspool up: {exc}", file=sys.stderr)
        return 2
    listener.set_inheritable(True)
    if not given_url:
        # The append-only file lets the server come back with what it acknowledged if it dies (it writes
        # each write there before answering; fsync every second bounds what a machine crash could lose).
        server = EmbeddedRedis(appendonly=True, appendfsync="everysec").start()
        env["TOKENSPOOL_REDIS_URL"] = server.url
    else:
        try:
            check_reachable(RedisTarget.of(gateway_settings))
        except RedisUnreachableError as exc:
            listener.close()
            print(f"tokenspool up: {exc}", file=sys.stderr)
            return 2
    for name, value in flags.items():
        if value is not None and name != "metrics_port":
            env[env_name(name)] = value
    env.pop(env_name("metrics_port"), None)  # one port per worker, below

    stop_requested = False

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    # Gateways behind one port pool their metrics, so a scrape reaching any of them reports all of them.
    metrics_dir = tempfile.mkdtemp(prefix="tokenspool-gateway-metrics-")
    gateway_env = {**env, env_name("metrics_multiproc_dir"): metrics_dir}
    # Workers never see the API keys: only gateways check them.
    worker_env = {k: v for k, v in env.items() if k not in (env_name("api_keys"), env_name("api_keys_file"))}
    host, port = listener.getsockname()[:2]
    stack = Stack(worker_env)  # no log folder: the children's output is this command's own
    workers = [f"worker{index}" for index in range(args.workers)]
    gateways = [f"gateway{index}" for index in range(args.gateways)]
    status = 0
    try:
        for index, name in enumerate(workers):
            own = {}
            if worker_settings.metrics_port is not None:  # worker i serves its metrics on the given port + i
                own[env_name("metrics_port")] = str(worker_settings.metrics_port + index)
            stack.start(name, ["worker", "--id", f"{socket.gethostname()}-w{index}"], env=own)
        for name in gateways:
            fd = listener.fileno()
            stack.start(name, ["gateway", "--fd", str(fd)], env=gateway_env, pass_fds=(fd,))
        base_url = f"http://{host}:{port}"
        model = worker_settings.model or "tokenspool-sim"
        redis_target = RedisTarget(env["TOKENSPOOL_REDIS_URL"], gateway_settings.redis_tls_ca_file)
        served = worker_settings.served_model_name or model
        stack.wait_ready(
            lambda: stop_requested or model_served(base_url, served, redis_target, worker_settings.worker_ttl_s),
            args.ready_timeout_s,
        )
        if not stop_requested:
            _print_banner(args, gateway_settings, worker_settings, base_url, env["TOKENSPOOL_REDIS_URL"])
        supervisor = Supervisor(_supervised(stack, workers, gateways, server, metrics_dir))
        while not stop_requested:
            supervisor.check()
            time.sleep(POLL_INTERVAL_S)
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


def _supervised(
    stack: Stack, workers: list[str], gateways: list[str], server: EmbeddedRedis | None, metrics_dir: str
) -> list[Supervised]:
    """What ``up`` supervises: the server first (the others need it), then the workers and the gateways."""
    children = []
    if server is not None:
        children.append(_server_supervised(server))
    children += [_process_supervised(stack, name, clean_exit_is_final=True) for name in workers]
    children += [_process_supervised(stack, name, after_exit=partial(forget_process, metrics_dir)) for name in gateways]
    return children


def _process_supervised(
    stack: Stack, name: str, *, clean_exit_is_final: bool = False, after_exit: Callable[[int], None] | None = None
) -> Supervised:
    def start_again() -> None:
        stack.restart(name)

    return Supervised(
        name,
        pid=lambda: stack[name].pid,
        returncode=lambda: stack[name].returncode,
        start_again=start_again,
        clean_exit_is_final=clean_exit_is_final,
        after_exit=after_exit,
    )


def _server_supervised(server: EmbeddedRedis) -> Supervised:
    def start_again() -> None:
        server.restart()

    return Supervised(
        "the embedded server", pid=lambda: server.pid, returncode=server.returncode, start_again=start_again
    )


def _print_banner(
    args: argparse.Namespace,
    gateway_settings: GatewaySettings,
    worker_settings: WorkerSettings,
    base_url: str,
    redis_url: str,
) -> None:
    model = worker_settings.model or "tokenspool-sim"
    key_header = (
        ' -H "Authorization: Bearer $YOUR_KEY"' if gateway_settings.api_keys or gateway_settings.api_keys_file else ""
    )
    engine_note = " (SIMULATED engine: filler words, for trying the broker)" if worker_settings.engine == "sim" else ""
    print(
        f"\ntokenspool is up at {base_url}: {args.gateways} gateway(s), {args.workers} worker(s), "
        f"model {model!r}{engine_note}\nRedis: {redis_url}\n\nTry:\n"
        f"  curl -N {base_url}/v1/chat/completions{key_header} -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], '
        f'"stream": true}}\'\n\nA process that exits is restarted. Ctrl-C stops everything.',
        flush=True,
    )
