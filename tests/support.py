"""Real processes for tests: the embedded server, gateways and workers started as `tokenspool` commands,
plus a small SSE reader. Nothing here mocks Redis or HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson

from shared import keys, registry, wire
from shared.redis_client import RedisTarget, connect_sync
from tokenspool.redis_server import free_port

T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.02) -> T:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def clean_env(redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSPOOL_")}
    if redis_url is not None:
        env["TOKENSPOOL_REDIS_URL"] = redis_url
    return env


def flags(settings: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in settings.items():
        out += ["--id" if name == "worker_id" else "--" + name.replace("_", "-"), str(value)]
    return out


@dataclass
class Proc:
    """A `tokenspool` child process whose output goes to a log file the test can show on failure."""

    argv: list[str]
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tokenspool", *self.argv],
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.killpg(self.process.pid, signum)

    def stop(self, timeout_s: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@dataclass
class Gateway:
    proc: Proc
    url: str


@dataclass
class Worker:
    proc: Proc
    worker_id: str


class Cluster:
    """Gateways and workers on one Redis URL; everything started is stopped by :meth:`close`."""

    def __init__(self, redis_url: str, log_dir: Path, *, env: dict[str, str] | None = None) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.env = env or {}
        """Extra variables for every process started (e.g. the TLS CA file)."""
        self.redis: Any = connect_sync(
            RedisTarget(redis_url, self.env.get("TOKENSPOOL_REDIS_TLS_CA_FILE", "")), socket_timeout_s=10
        )
        self.procs: list[Proc] = []
        self._count = 0

    def _proc(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        self._count += 1
        proc = Proc(argv, self.log_dir / f"{self._count:02d}-{name}.log", env or self.child_env())
        self.procs.append(proc)
        return proc

    def child_env(self) -> dict[str, str]:
        return {**clean_env(self.redis_url), **self.env}

    def gateway(self, *, wait: bool = True, env: dict[str, str] | None = None, **settings: Any) -> Gateway:
        port = settings.pop("port", None) or free_port()
        proc = self._proc(
            "gateway", ["gateway", "--port", str(port), *flags(settings)], {**self.child_env(), **(env or {})}
        )
        gateway = Gateway(proc, f"http://127.0.0.1:{port}")
        if wait:

            def ready() -> bool:
                if not proc.alive():
                    raise AssertionError(f"gateway exited:\n{proc.log()}")
                try:
                    return httpx.get(gateway.url + "/readyz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(ready, 30, "the gateway to answer /readyz")
        return gateway

    def worker(self, *, wait: bool = True, env: dict[str, str] | None = None, **settings: Any) -> Worker:
        self._count += 1
        worker_id = settings.setdefault("worker_id", f"test-worker-{os.getpid()}-{self._count}")
        proc = self._proc("worker", ["worker", *flags(settings)], {**self.child_env(), **(env or {})})
        worker = Worker(proc, worker_id)
        if wait:

            def registered() -> bool:
                if not proc.alive():
                    raise AssertionError(f"worker exited:\n{proc.log()}")
                raw = self.redis.hget(keys.workers_key(), worker_id)
                return raw is not None and wire.decode(raw, wire.WorkerInfo).state == "active"  # type: ignore[arg-type]

            wait_for(registered, 60, f"worker {worker_id} to register")
        return worker

    def live_workers(self) -> list[wire.WorkerInfo]:
        now = int(time.time() * 1000)
        raw = self.redis.hgetall(keys.workers_key())
        infos = [wire.decode(v, wire.WorkerInfo) for v in raw.values()]  # type: ignore[union-attr]
        return [i for i in infos if registry.is_live(i, now, 5.0)]

    def meta(self, request_id: str) -> dict[str, str]:
        raw = self.redis.hgetall(keys.RequestKeys.of(request_id).meta)
        return {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.alive():
                proc.stop()
        self.redis.close()


# -- SSE --------------------------------------------------------------------------------------------


@dataclass
class SSEEvent:
    id: str | None
    data: str
    raw: bytes

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass
class SSEStream:
    events: list[SSEEvent]
    comments: list[str]
    headers: httpx.Headers | None = None


def parse_frames(buffer: bytes) -> tuple[list[SSEEvent | str], bytes]:
    """Split complete SSE frames off ``buffer``; (events and comments, the incomplete rest)."""
    out: list[SSEEvent | str] = []
    while b"\n\n" in buffer:
        frame, buffer = buffer.split(b"\n\n", 1)
        event_id: str | None = None
        data: list[str] = []
        comments: list[str] = []
        for line in frame.decode().split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].strip())
            elif line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            out.append(SSEEvent(event_id, "\n".join(data), frame + b"\n\n"))
        out.extend(comments)
    return out, buffer


def iter_sse(response: httpx.Response) -> Iterator[SSEEvent | str]:
    buffer = b""
    for chunk in response.iter_raw():
        buffer += chunk
        items, buffer = parse_frames(buffer)
        yield from items


def read_stream(
    method: str, url: str, *, limit: int | None = None, timeout_s: float = 30.0, **kwargs: Any
) -> SSEStream:
    """Read an SSE response to ``[DONE]`` (or ``limit`` events, then drop the connection)."""
    events: list[SSEEvent] = []
    comments: list[str] = []
    with httpx.Client(timeout=timeout_s) as client, client.stream(method, url, **kwargs) as response:
        if response.status_code != 200:
            response.read()
            raise AssertionError(f"{method} {url}: {response.status_code} {response.text}")
        for item in iter_sse(response):
            if isinstance(item, str):
                comments.append(item)
                continue
            events.append(item)
            if item.data == "[DONE]" or (limit is not None and len(events) >= limit):
                break
        return SSEStream(events, comments, response.headers)


def chat_body(
    prompt: str = "Tell me about streams",
    *,
    max_tokens: int = 24,
    seed: int | None = 7,
    stream: bool = True,
    model: str = "tokenspool-sim",
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": stream,
        **extra,
    }
    if seed is not None:
        body["seed"] = seed
    return body


def content_of(events: list[SSEEvent]) -> str:
    """The text of chat chunk events (ignoring [DONE] and usage-only chunks)."""
    parts = []
    for event in events:
        if event.data == "[DONE]":
            continue
        for choice in event.json().get("choices", []):
            parts.append(choice.get("delta", {}).get("content") or choice.get("text") or "")
    return "".join(parts)
