"""The process stack: tokenspool's processes started as children, waited on until ready, stopped as a whole.

``tokenspool up``, ``soak``, ``footprint``, ``bench``, ``bench-vllm`` and the tests all run gateways, workers
(and the benchmarks' own servers) as real child processes; this module is the one way they do it:

- :class:`Process`: one child, ``python -m <module> <argv>`` in a process group of its own (Ctrl-C at a
  terminal reaches only the parent; the child's own children can be killed with it), its output in a log
  file or, with no log file, on the parent's own output; optionally pinned to CPUs.
- :class:`Stack`: named processes sharing an environment and a log folder, waited on together (any of them
  exiting during a wait fails it at once, with the end of its log), started again as they were started
  (:meth:`Stack.restart`, for ``up``'s supervisor) and stopped together in order.
- the readiness probes: a gateway answers ``/readyz``, it lists a model, a live worker serves a model.

Stopping is the same everywhere: SIGTERM to each process itself (a worker stops its engine after draining,
so the engine must not be signalled first), one deadline for all of them, then SIGKILL to the whole group of
any still running, and of anything a stopped process left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import redis

from tokenspool.shared import keys, registry, wire
from tokenspool.shared.redis_client import RedisTarget, connect_sync

T = TypeVar("T")

DEFAULT_STOP_TIMEOUT_S = 15.0
PROBE_TIMEOUT_S = 2.0


class StackError(RuntimeError):
    """A process of the stack exited while it was awaited, or the stack was not ready in time."""


def child_env(base: Mapping[str, str], redis_url: str | None = None) -> dict[str, str]:
    """``base`` without any ``TOKENSPOOL_*`` variable, so a child gets exactly the settings it is given,
    plus the Redis URL when there is one."""
    env = {name: value for name, value in base.items() if not name.startswith("TOKENSPOOL_")}
    if redis_url is not None:
        env["TOKENSPOOL_REDIS_URL"] = redis_url
    return env


def flags(settings: Mapping[str, object]) -> list[str]:
    """Settings as command-line flags (``max_num_seqs=4`` -> ``--max-num-seqs 4``; ``worker_id`` -> ``--id``)."""
    out: list[str] = []
    for name, value in settings.items():
        out += ["--id" if name == "worker_id" else "--" + name.replace("_", "-"), str(value)]
    return out


INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then act on them as this process would have.

    A ``KeyboardInterrupt`` raised inside ``Popen`` (the parent waits there until the child has run its
    ``exec``) leaves a child running that no :class:`Stack` knows of, so no ``finally`` stops it: starting
    a process and registering it must happen together. Only the main thread receives signals in Python;
    elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda got, _frame: caught.append(got)) for signum in INTERRUPTS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for got in dict.fromkeys(caught):
            handler = previous[signal.Signals(got)]
            if callable(handler):
                handler(got, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(got)


class Process:
    """One child process: ``python -m <module> <argv>`` (``tokenspool <argv>`` by default), started at once.

    ``log_path`` receives its output (appended); ``None`` leaves it on the parent's own output. ``cpus``
    pins it (and what it starts) to those CPUs."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path | None,
        env: Mapping[str, str],
        *,
        module: str = "tokenspool",
        name: str | None = None,
        pass_fds: tuple[int, ...] = (),
        cpus: frozenset[int] | None = None,
    ) -> None:
        self.argv = argv
        self.name = name or (argv[0] if argv else module)
        self.log_path = log_path
        self.env = dict(env)
        self.module = module
        self.pass_fds = pass_fds
        self.cpus = cpus
        self.started_at = time.monotonic()

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        with contextlib.ExitStack() as files:
            log = files.enter_context(open(log_path, "ab")) if log_path is not None else None
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, *argv],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT if log is not None else None,
                stdin=subprocess.DEVNULL,
                pass_fds=pass_fds,
                preexec_fn=pin if cpus else None,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def alive(self) -> bool:
        return self.process.poll() is None

    def again(self) -> Process:
        """The same command started anew (same arguments, environment, inherited sockets, CPUs and log), once
        this one has exited; what it left behind in its process group is killed first."""
        if self.alive():
            raise ValueError(f"{self.name} is still running")
        self.kill()
        return Process(
            self.argv,
            self.log_path,
            self.env,
            module=self.module,
            name=self.name,
            pass_fds=self.pass_fds,
            cpus=self.cpus,
        )

    def log(self) -> str:
        """Its whole log so far ("" when its output is not in a file)."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def exited(self, during: str) -> StackError:
        """The error saying that this process has exited while ``during``, with the end of its log."""
        if self.log_path is None:
            return StackError(f"a process exited {during} (exit code {self.returncode}); see its log above")
        tail = self.log()[-2000:]
        return StackError(f"{self.name} exited {during} (exit code {self.returncode}); {self.log_path} ends:\n{tail}")

    def signal(self, signum: int) -> None:
        """Send ``signum`` to its whole process group (the process and what it started)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def terminate(self) -> None:
        """SIGTERM to the process itself: it stops what it started, in its own order."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL to its group after ``timeout_s``; its exit code."""
        stop_all([self], timeout_s)
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL to its whole group, and reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def stop_all(processes: Iterable[Process], timeout_s: float) -> None:
    """Stop ``processes`` together: SIGTERM to each, one deadline for all, then SIGKILL to the group of each
    one still running, and to what each stopped one left behind."""
    processes = list(processes)
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.process.wait(max(0.1, deadline - time.monotonic()))
        process.kill()


def wait_until(
    ready: Callable[[], T | None],
    *,
    timeout_s: float,
    what: str,
    watch: Iterable[Process] = (),
    interval_s: float = 0.1,
) -> T:
    """Poll ``ready`` until it returns something true, and return that. Fails with :class:`StackError` as
    soon as one of the ``watch`` processes exits, or after ``timeout_s`` ("<what> was not ready within ...")."""
    watched = list(watch)
    deadline = time.monotonic() + timeout_s
    while True:
        for process in watched:
            if not process.alive():
                raise process.exited("during start-up")
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StackError(f"{what} was not ready within {timeout_s:.0f}s")
        time.sleep(interval_s)


class Stack:
    """Named processes that share an environment and a log folder (``<log_prefix><name>.log``; none: the
    parent's own output). Stopped newest first by :meth:`close` (or leaving the ``with`` block), each given
    ``stop_timeout_s`` to exit after SIGTERM."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_dir: Path | None = None,
        *,
        log_prefix: str = "",
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
    ) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.log_prefix = log_prefix
        self.stop_timeout_s = stop_timeout_s
        self.processes: dict[str, Process] = {}

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        module: str = "tokenspool",
        pass_fds: tuple[int, ...] = (),
        cpus: frozenset[int] | None = None,
    ) -> Process:
        """Start ``python -m <module> <argv>`` as ``name`` with the stack's environment plus ``env``."""
        if name in self.processes:
            raise ValueError(f"the stack already has a process named {name!r}")
        log_path = None if self.log_dir is None else self.log_dir / f"{self.log_prefix}{name}.log"
        with interrupts_deferred():
            process = Process(
                argv,
                log_path,
                {**self.env, **(env or {})},
                module=module,
                name=name,
                pass_fds=pass_fds,
                cpus=cpus,
            )
            self.processes[name] = process
        return process

    def __getitem__(self, name: str) -> Process:
        return self.processes[name]

    def wait_ready(self, ready: Callable[[], T | None], timeout_s: float, what: str = "the stack") -> T:
        """:func:`wait_until`, failing as soon as any process of the stack exits."""
        return wait_until(ready, timeout_s=timeout_s, what=what, watch=self.processes.values())

    def exited(self) -> list[Process]:
        return [process for process in self.processes.values() if not process.alive()]

    def stop(self, names: Iterable[str], timeout_s: float | None = None) -> None:
        """Stop these processes together (see :func:`stop_all`) and forget them."""
        stopping = [self.processes.pop(name) for name in list(names) if name in self.processes]
        stop_all(stopping, self.stop_timeout_s if timeout_s is None else timeout_s)

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` and what it started, at once (a crash, as the soak test makes them)."""
        self.processes.pop(name).kill()

    def restart(self, name: str) -> Process:
        """Start ``name`` again, as it was started, after it exited (see :meth:`Process.again`)."""
        process = self.processes[name].again()
        self.processes[name] = process
        return process

    def close(self) -> None:
        """Stop every process, newest first (gateways before the workers behind them, Redis last)."""
        for name in reversed(list(self.processes)):
            self.stop([name])

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -- readiness probes: each answers False while the thing asked is not (yet) there -------------------------


def _get(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes] | None:
    """``GET url``: (status, body), or None when nothing answers. urllib, not httpx: a probe runs every tenth
    of a second while a stack starts, and an httpx client costs milliseconds of CPU to build."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""
    except (OSError, ValueError):  # not listening yet, reset, timed out
        return None


def http_ok(url: str, headers: Mapping[str, str] | None = None) -> bool:
    """Whether ``GET url`` answers 2xx."""
    answer = _get(url, headers)
    return answer is not None and 200 <= answer[0] < 300


def gateway_ready(base_url: str) -> bool:
    """Whether a gateway answers ``/readyz`` (it reaches Redis)."""
    return http_ok(base_url + "/readyz")


def listed_models(base_url: str, headers: Mapping[str, str] | None = None) -> list[str] | None:
    """The model ids a gateway's ``/v1/models`` lists; None when it does not answer 200."""
    return _model_ids(_get(base_url + "/v1/models", headers))


def _model_ids(answer: tuple[int, bytes] | None) -> list[str] | None:
    if answer is None or answer[0] != 200:
        return None
    try:
        body = json.loads(answer[1])
    except ValueError:
        return None
    data = body.get("data") if isinstance(body, dict) else None
    return [str(m.get("id")) for m in data if isinstance(m, dict)] if isinstance(data, list) else None


def model_listed(base_url: str, model: str, headers: Mapping[str, str] | None = None) -> bool:
    """Whether a gateway lists ``model``: a live worker serves it, and the gateway sees that worker."""
    return model in (listed_models(base_url, headers) or ())


def model_registered(target: RedisTarget, model: str, ttl_s: float) -> bool:
    """Whether a live worker serves ``model``, read from the registry itself (for a gateway that needs a key
    the reader does not have)."""
    try:
        client = connect_sync(target, socket_timeout_s=PROBE_TIMEOUT_S)
        try:
            raw: dict[bytes, bytes] = client.hgetall(keys.workers_key())  # type: ignore[assignment]
        finally:
            client.close()
    except (redis.RedisError, redis.exceptions.RedisClusterException):
        return False
    now = int(time.time() * 1000)
    for payload in raw.values():
        with contextlib.suppress(wire.WireError):
            info = wire.decode(payload, wire.WorkerInfo)
            if info.model == model and registry.is_live(info, now, ttl_s):
                return True
    return False


def model_served(base_url: str, model: str, target: RedisTarget, ttl_s: float) -> bool:
    """Whether a gateway answers and a live worker serves ``model``: from the gateway's list, or, when the
    gateway wants an API key (401), from the registry."""
    answer = _get(base_url + "/v1/models")
    if answer is not None and answer[0] == 401:
        return model_registered(target, model, ttl_s)
    return model in (_model_ids(answer) or ())


def redis_answers(target: RedisTarget) -> bool:
    """Whether Redis answers PING."""
    try:
        client = connect_sync(target, socket_timeout_s=PROBE_TIMEOUT_S)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, redis.exceptions.RedisClusterException):
        return False
