"""Real processes for tests: the embedded server, gateways and workers started as `tokenspool` commands
through the one process-stack module (tokenspool.stack), read with the client's own SSE decoder. Nothing
here mocks Redis or HTTP."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tokenspool.client_core import SSEComment, SSEDecoder, SSEMessage
from tokenspool.redis_server import free_port
from tokenspool.shared import keys, registry, wire
from tokenspool.shared.redis_client import RedisTarget, connect_sync
from tokenspool.stack import Process, Stack, StackError, child_env, flags, gateway_ready, model_listed, wait_until

T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.02) -> T:
    """Poll until ``predicate`` returns something truthy (:func:`tokenspool.stack.wait_until`); fail the test
    with ``what`` after ``timeout_s``."""
    try:
        return wait_until(predicate, timeout_s=timeout_s, what=what, interval_s=interval_s)
    except StackError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


def clean_env(redis_url: str | None) -> dict[str, str]:
    """This process's environment without any ``TOKENSPOOL_*`` variable, plus the Redis URL."""
    return child_env(os.environ, redis_url)


Proc = Process
"""A `tokenspool` child process whose output goes to a log file the test can show on failure."""


@dataclass
class Gateway:
    proc: Proc
    url: str


@dataclass
class Worker:
    proc: Proc
    worker_id: str


class Cluster:
    """Gateways and workers on one Redis URL (a :class:`~tokenspool.stack.Stack`); everything started is
    stopped by :meth:`close`."""

    def __init__(self, redis_url: str, log_dir: Path, *, env: dict[str, str] | None = None) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.env = env or {}
        """Extra variables for every process started (e.g. the TLS CA file)."""
        self.redis: Any = connect_sync(
            RedisTarget(redis_url, self.env.get("TOKENSPOOL_REDIS_TLS_CA_FILE", "")), socket_timeout_s=10
        )
        self.stack = Stack(self.child_env(), log_dir)
        self._count = 0

    @property
    def procs(self) -> list[Proc]:
        return list(self.stack.processes.values())

    def _proc(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        self._count += 1
        return self.stack.start(f"{self._count:02d}-{name}", argv, env=env)

    def child_env(self) -> dict[str, str]:
        return {**clean_env(self.redis_url), **self.env}

    def gateway(self, *, wait: bool = True, env: dict[str, str] | None = None, **settings: Any) -> Gateway:
        port = settings.pop("port", None) or free_port()
        proc = self._proc("gateway", ["gateway", "--port", str(port), *flags(settings)], env)
        gateway = Gateway(proc, f"http://127.0.0.1:{port}")
        if wait:
            wait_until(partial(gateway_ready, gateway.url), timeout_s=30, what="the gateway", watch=[proc])
        return gateway

    def worker(self, *, wait: bool = True, env: dict[str, str] | None = None, **settings: Any) -> Worker:
        self._count += 1
        worker_id = settings.setdefault("worker_id", f"test-worker-{os.getpid()}-{self._count}")
        proc = self._proc("worker", ["worker", *flags(settings)], env)
        worker = Worker(proc, worker_id)
        if wait:

            def registered() -> bool:
                raw = self.redis.hget(keys.workers_key(), worker_id)
                return raw is not None and wire.decode(raw, wire.WorkerInfo).state == "active"  # type: ignore[arg-type]

            wait_until(registered, timeout_s=60, what=f"worker {worker_id}", watch=[proc], interval_s=0.02)
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
        self.stack.close()
        self.redis.close()


def wait_for_model(
    gateway: Gateway | str,
    model: str,
    timeout_s: float = 10.0,
    *,
    headers: dict[str, str] | None = None,
    interval_s: float = 0.02,
    watch: Sequence[Proc] = (),
) -> None:
    """Wait until a gateway lists ``model`` in ``/v1/models`` (a live worker serves it and the gateway sees
    it): the one way tests wait for a model to be served. Fails at once, with its log, if a ``watch``
    process (e.g. the worker loading the model) exits meanwhile."""
    url = gateway if isinstance(gateway, str) else gateway.url

    def listed() -> bool:
        for proc in watch:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited before model {model} was listed:\n{proc.log()[-6000:]}")
        return model_listed(url, model, headers)

    wait_for(listed, timeout_s, f"model {model} to be listed at {url}", interval_s)


# -- SSE --------------------------------------------------------------------------------------------


EVENT_STREAM: dict[str, str] = {"Accept": "text/event-stream"}
"""The header of a client that resumes: a POST's events then carry ids (a plain POST gets vLLM's frames)."""

SSEEvent = SSEMessage
"""An SSE event as the client's decoder reads it, its raw frame kept (``.raw``) for byte-exact comparisons."""


@dataclass
class SSEStream:
    events: list[SSEEvent]
    """The events with a position (an id), then ``[DONE]`` and any error without an id."""
    comments: list[str]
    headers: httpx.Headers | None = None
    opening: list[SSEEvent] = field(default_factory=list)
    """A chat stream's opening role chunks (one per choice, as vLLM sends them): no id, no text."""


OPENING_DELTA = re.compile(r'"delta":\{"role":"[a-z]+","content":""\}')


def is_opening(item: SSEEvent) -> bool:
    """A chat stream's opening role chunk (one per choice, as vLLM sends them, in the reply's role): no id, no
    text."""
    return item.id is None and OPENING_DELTA.search(item.data) is not None


def iter_sse(response: httpx.Response, opening: list[SSEEvent] | None = None) -> Iterator[SSEEvent | str]:
    """The events of an SSE response (comments as their text), decoded by the client's own decoder. A chat
    stream's opening role chunks are left out (into ``opening`` when given): tests count positioned events."""
    decoder = SSEDecoder(keep_raw=True)
    for chunk in response.iter_raw():
        for item in decoder.feed(chunk):
            if isinstance(item, SSEComment):
                yield item.text
            elif is_opening(item):
                if opening is not None:
                    opening.append(item)
            else:
                yield item


def read_stream(
    method: str, url: str, *, limit: int | None = None, timeout_s: float = 30.0, **kwargs: Any
) -> SSEStream:
    """Read an SSE response to ``[DONE]`` (or ``limit`` events, then drop the connection), as a client that
    resumes: it asks for ``text/event-stream`` (so a POST's events carry ids) unless ``headers`` say otherwise."""
    events: list[SSEEvent] = []
    comments: list[str] = []
    kwargs["headers"] = {**EVENT_STREAM, **(kwargs.get("headers") or {})}
    opening: list[SSEEvent] = []
    with httpx.Client(timeout=timeout_s) as client, client.stream(method, url, **kwargs) as response:
        if response.status_code != 200:
            response.read()
            raise AssertionError(f"{method} {url}: {response.status_code} {response.text}")
        for item in iter_sse(response, opening):
            if isinstance(item, str):
                comments.append(item)
                continue
            events.append(item)
            if item.data == "[DONE]" or (limit is not None and len(events) >= limit):
                break
        return SSEStream(events, comments, response.headers, opening)


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


def plain_job(model: str, prompt: str = "hello") -> wire.Job:
    """A new chat request's job with default sampling (for tests that drive the store in process)."""
    now = int(time.time() * 1000)
    return wire.Job(
        request_id=keys.new_request_id("chat"),
        kind="chat",
        model=model,
        prompt=prompt,
        messages=(),
        sampling=wire.SamplingOptions(),
        created_s=now // 1000,
        enqueued_ms=now,
    )
