"""The Python client against real gateways and workers: streams equal their stored replay, survive a killed
gateway, a silent connection and a lost answer to the POST, re-attach from a fresh client, cancel, and raise
typed errors for bad requests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import Cluster, Gateway, Worker, read_stream, wait_for, wait_for_model
from tokenspool.client import (
    AsyncClient,
    Backoff,
    BadRequestError,
    Client,
    ConflictError,
    ConnectionFailedError,
    NotFoundError,
    RequestCancelledError,
    StreamEvent,
)
from tokenspool.redis_server import free_port
from tokenspool.shared import keys

FAST_RETRY = Backoff(base_s=0.02, cap_s=0.2, max_attempts=20)
MODELS: dict[str, dict[str, Any]] = {
    "client-basic": {"sim_itl_ms": 5, "sim_ttft_ms": 10},
    "client-kill": {"sim_itl_ms": 40, "sim_ttft_ms": 10},
    "client-silent": {"sim_itl_ms": 700, "sim_ttft_ms": 10},
    "client-pinged": {"sim_itl_ms": 700, "sim_ttft_ms": 10},
    "client-attach": {"sim_itl_ms": 20, "sim_ttft_ms": 10},
    "client-cancel": {"sim_itl_ms": 30, "sim_ttft_ms": 10},
    "client-idem": {"sim_itl_ms": 5, "sim_ttft_ms": 10},
    "client-errors": {"sim_itl_ms": 5, "sim_ttft_ms": 10},
    "client-sync": {"sim_itl_ms": 600, "sim_ttft_ms": 10},
    "client-busy": {"sim_itl_ms": 10, "sim_ttft_ms": 10, "max_num_seqs": 1},
}
USER = [{"role": "user", "content": "tell me about resumable streams"}]


@pytest.fixture(scope="module")
def gateways(cluster: Cluster) -> list[Gateway]:
    """Two gateways and one sim worker per model (one model per test), started in parallel."""
    workers = [cluster.worker(model=model, wait=False, **settings) for model, settings in MODELS.items()]
    gateways = [cluster.gateway(), cluster.gateway()]
    wait_for_workers(cluster, workers)
    for gateway in gateways:
        wait_for_models(gateway)
    return gateways


def wait_for_workers(cluster: Cluster, workers: list[Worker]) -> None:
    def registered() -> bool:
        return all(cluster.redis.hexists(keys.workers_key(), w.worker_id) for w in workers)

    wait_for(registered, 60, "the workers to register")


def wait_for_models(gateway: Gateway) -> None:
    for model in MODELS:
        wait_for_model(gateway, model, 20)


def replay(gateway: Gateway, request_id: str) -> list[tuple[str, Any]]:
    """The request's stored events, read from the start: (event id, parsed data) of every event with an id."""
    stored = read_stream("GET", f"{gateway.url}/v1/requests/{request_id}/events")
    assert stored.events[-1].data == "[DONE]"
    return [(e.id, e.json()) for e in stored.events if e.id is not None]


def assert_equals_replay(events: list[StreamEvent], gateway: Gateway) -> None:
    request_id = events[0].request_id
    assert [(e.event_id, e.chunk) for e in events] == replay(gateway, request_id), "lost, repeated or changed"
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), "event ids are not contiguous"


def requests_for_model(cluster: Cluster, model: str) -> int:
    metas = cluster.redis.scan_iter(match="ts:*:r:*:meta", count=1000)
    return sum(1 for key in metas if cluster.redis.hget(key, "model") == model.encode())


def test_a_stream_completes_and_equals_the_stored_replay(gateways: list[Gateway]) -> None:
    async def run() -> tuple[list[StreamEvent], int, Any]:
        async with AsyncClient(gateways[0].url + "/v1") as client:
            async with client.stream_chat(USER, model="client-basic", max_tokens=12, seed=3) as stream:
                events = [event async for event in stream]
            return events, stream.resumes, (stream.finish_reason, stream.usage, stream.request_id)

    events, resumes, (finish_reason, usage, request_id) = asyncio.run(run())
    assert_equals_replay(events, gateways[1])
    assert resumes == 0 and request_id == events[0].request_id
    assert len("".join(e.text for e in events).split()) == 12
    assert finish_reason == "length"
    assert usage is not None and usage.completion_tokens == 12 and events[-1].usage == usage


def test_a_killed_gateway_is_left_for_the_next_and_the_stream_completes(
    cluster: Cluster, gateways: list[Gateway]
) -> None:
    doomed = cluster.gateway()
    wait_for_models(doomed)

    async def run() -> tuple[list[StreamEvent], int, str | None]:
        async with AsyncClient([doomed.url, gateways[1].url], backoff=FAST_RETRY) as client:
            async with client.stream_chat(USER, model="client-kill", max_tokens=60, seed=5) as stream:
                events: list[StreamEvent] = []
                async for event in stream:
                    events.append(event)
                    if len(events) == 5:
                        doomed.proc.kill()
            return events, stream.resumes, stream.last_failure

    events, resumes, last_failure = asyncio.run(run())
    assert not doomed.proc.alive()
    assert resumes == 1, last_failure
    assert_equals_replay(events, gateways[0])
    assert len("".join(e.text for e in events).split()) == 60


def test_a_worker_handover_skips_exactly_one_event_id_and_nothing_else(
    cluster: Cluster, gateways: list[Gateway]
) -> None:
    model = "client-handover"
    fast_lease: dict[str, Any] = {"lease_timeout_s": 1.0, "worker_heartbeat_s": 0.2, "sim_itl_ms": 20}
    workers = [cluster.worker(model=model, wait=False, sim_ttft_ms=10, **fast_lease) for _ in range(2)]
    wait_for_workers(cluster, workers)
    wait_for_model(gateways[0], model, 20)

    async def run() -> list[StreamEvent]:
        async with AsyncClient(gateways[0].url) as client:
            async with client.stream_chat(USER, model=model, max_tokens=80, seed=8) as stream:
                events: list[StreamEvent] = []
                async for event in stream:
                    events.append(event)
                    if len(events) == 5:
                        serving = (await client.status(event.request_id)).worker
                        next(w for w in workers if w.worker_id == serving).proc.kill()
            return events

    events = asyncio.run(run())
    assert [(e.event_id, e.chunk) for e in events] == replay(gateways[1], events[0].request_id)
    steps = [b.seq - a.seq for a, b in itertools.pairwise(events)]
    assert sorted(set(steps)) == [1, 2] and steps.count(2) == 1, "one skipped id: the handover's own"
    assert len("".join(e.text for e in events).split()) == 80


def test_a_silent_connection_is_dropped_after_the_inter_token_timeout_and_resumed(gateways: list[Gateway]) -> None:
    async def run() -> tuple[list[StreamEvent], int, str | None]:
        async with AsyncClient([g.url for g in gateways], inter_token_timeout_s=0.25, backoff=FAST_RETRY) as client:
            async with client.stream_chat(USER, model="client-silent", max_tokens=4, seed=1) as stream:
                events = [event async for event in stream]
            return events, stream.resumes, stream.last_failure

    events, resumes, last_failure = asyncio.run(run())
    assert resumes >= 3, "one resume at least per 700 ms gap between tokens"
    assert last_failure is not None and "ReadTimeout" in last_failure
    assert_equals_replay(events, gateways[0])


def test_heartbeat_comments_keep_a_slow_stream_alive(cluster: Cluster, gateways: list[Gateway]) -> None:
    chatty = cluster.gateway(heartbeat_s=0.1)
    wait_for_models(chatty)

    async def run() -> tuple[list[StreamEvent], int]:
        async with AsyncClient(chatty.url, inter_token_timeout_s=0.5, backoff=FAST_RETRY) as client:
            async with client.stream_chat(USER, model="client-pinged", max_tokens=3, seed=1) as stream:
                events = [event async for event in stream]
            return events, stream.retries

    events, retries = asyncio.run(run())
    assert retries == 0, "pings every 0.1 s count as liveness; tokens come every 0.7 s"
    assert_equals_replay(events, gateways[0])


def test_a_fresh_client_attaches_by_request_id_and_gets_the_same_events(gateways: list[Gateway]) -> None:
    async def run() -> tuple[list[StreamEvent], list[StreamEvent], list[StreamEvent]]:
        head: list[StreamEvent] = []
        async with (
            AsyncClient(gateways[0].url) as first,
            first.stream_chat(USER, model="client-attach", max_tokens=30, seed=9) as stream,
        ):
            async for event in stream:
                head.append(event)
                if len(head) == 4:
                    break
        async with AsyncClient(gateways[1].url) as second:
            tail = [event async for event in second.attach(head[-1].request_id, last_event_id=head[-1].event_id)]
        async with AsyncClient(gateways[1].url) as third:
            whole = [event async for event in third.attach(head[-1].request_id)]
        return head, tail, whole

    head, tail, whole = asyncio.run(run())
    assert len(head) == 4
    assert_equals_replay(head + tail, gateways[0])
    assert whole == head + tail


def test_cancel_ends_the_stream_with_a_cancelled_error(gateways: list[Gateway]) -> None:
    async def run() -> None:
        async with AsyncClient([g.url for g in gateways]) as client:
            stream = client.stream_chat(USER, model="client-cancel", max_tokens=1000)
            seen = 0
            with pytest.raises(RequestCancelledError) as raised:
                async with stream:
                    async for _event in stream:
                        seen += 1
                        if seen == 3:
                            assert stream.request_id is not None
                            cancelled = await client.cancel(stream.request_id)
                            assert cancelled.state in ("cancelling", "cancelled")
            assert raised.value.code == "cancelled" and raised.value.request_id == stream.request_id
            assert seen < 100, "generation stopped long before max_tokens"
            assert stream.request_id is not None
            status = await client.status(stream.request_id)
            assert status.state == "cancelled" and status.terminal
            with pytest.raises(ConflictError) as again:
                await client.cancel(stream.request_id)
            assert again.value.status == 409 and again.value.code == "request_ended"

    asyncio.run(run())


def test_bad_requests_raise_typed_errors_without_retrying(gateways: list[Gateway]) -> None:
    async def run() -> None:
        async with AsyncClient([g.url for g in gateways]) as client:
            stream = client.stream_chat(USER, model="client-errors", n=3)  # the sim engine serves one choice
            with pytest.raises(BadRequestError) as bad:
                await anext(stream)
            assert (bad.value.status, bad.value.code, bad.value.param) == (400, "unsupported_parameter", "n")
            assert stream.retries == 0

            stream = client.stream_completion("hi", model="no-such-model")
            with pytest.raises(NotFoundError) as unknown:
                await anext(stream)
            assert (unknown.value.status, unknown.value.code) == (404, "model_not_found")

            stream = client.attach(keys.new_request_id("chat"))
            with pytest.raises(NotFoundError) as missing:
                await anext(stream)
            assert missing.value.code == "request_not_found" and stream.retries == 0

            with pytest.raises(ValueError, match="belongs to request"):
                client.attach(keys.new_request_id("chat"), last_event_id=keys.event_id(keys.new_request_id("chat"), 3))
            with pytest.raises(ValueError, match="not a tokenspool request id"):
                await client.status("../healthz")

        nobody = f"http://127.0.0.1:{free_port()}"
        async with AsyncClient(nobody, backoff=Backoff(base_s=0.01, cap_s=0.02, max_attempts=3)) as client:
            stream = client.stream_chat(USER, model="client-errors")
            with pytest.raises(ConnectionFailedError, match="gave up after 3"):
                await anext(stream)
            assert stream.retries == 3

    asyncio.run(run())


def submit_and_leave(gateway: Gateway, body: dict[str, Any]) -> str:
    """Submit a background request and drop the connection once the gateway has named it."""
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=10) as response:
        assert response.status_code == 200, response.read()
        return response.headers["x-request-id"]


def test_a_full_queue_is_waited_out_as_retry_after_says(cluster: Cluster, gateways: list[Gateway]) -> None:
    strict = cluster.gateway(max_queue_depth=1)
    wait_for_models(strict)
    body = {"model": "client-busy", "messages": USER, "max_tokens": 4, "stream": True, "background": True}
    # The running request lasts 2.5 s of engine time, so the queue is still full when the third request comes,
    # however slowly this machine gets there; the one that waits is short.
    running = submit_and_leave(strict, {**body, "max_tokens": 250})
    wait_for(lambda: cluster.meta(running).get("state") == "running", 10, "the first request to run")
    submit_and_leave(strict, body)  # waits in the queue: the queue is now full
    assert httpx.post(strict.url + "/v1/chat/completions", json=body).status_code == 429

    async def run() -> tuple[list[StreamEvent], int, str | None, float]:
        async with AsyncClient(strict.url, backoff=Backoff(base_s=0.01, cap_s=0.05, max_attempts=10)) as client:
            started = asyncio.get_running_loop().time()
            async with client.stream_chat(USER, model="client-busy", max_tokens=4) as stream:
                first = await anext(stream)
                waited = asyncio.get_running_loop().time() - started
                events = [first] + [event async for event in stream]
            return events, stream.retries, stream.last_failure, waited

    events, retries, last_failure, waited_s = asyncio.run(run())
    assert retries >= 1 and last_failure is not None and "queue_full" in last_failure
    assert waited_s >= 1.0, "Retry-After: 1 is honoured although the backoff alone would wait at most 50 ms"
    assert_equals_replay(events, gateways[0])


class DropFirstAnswer:
    """A TCP proxy in front of a gateway that forwards everything, except that it cuts the first connection
    as soon as the gateway starts to answer it: the POST was accepted, but its client never saw an answer."""

    def __init__(self, upstream_url: str) -> None:
        self.upstream = httpx.URL(upstream_url)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.cut = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                downstream, _ = self.listener.accept()
                upstream = socket.create_connection((self.upstream.host, self.upstream.port or 80))
                self.sockets += [downstream, upstream]
                self.connections += 1
                cut_this = self.connections == 1
                for source, sink, is_answer in ((downstream, upstream, False), (upstream, downstream, True)):
                    args = (source, sink, cut_this and is_answer)
                    thread = threading.Thread(target=self._pump, args=args, daemon=True)
                    self.threads.append(thread)
                    thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, cut: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if cut:
                    self.cut.set()
                    for sock in (source, sink):
                        sock.shutdown(socket.SHUT_RDWR)
                    return
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def dropping_proxy(gateways: list[Gateway]) -> Iterator[DropFirstAnswer]:
    proxy = DropFirstAnswer(gateways[0].url)
    try:
        yield proxy
    finally:
        proxy.close()


def test_a_post_whose_answer_was_lost_is_retried_onto_the_same_request(
    cluster: Cluster, gateways: list[Gateway], dropping_proxy: DropFirstAnswer
) -> None:
    async def run() -> tuple[list[StreamEvent], int, int, list[StreamEvent]]:
        async with AsyncClient(dropping_proxy.url, backoff=FAST_RETRY) as client:
            async with client.stream_chat(USER, model="client-idem", max_tokens=8, seed=4) as stream:
                events = [event async for event in stream]
            async with AsyncClient(gateways[1].url) as other:
                key = "client-test-explicit-key"
                first = [e async for e in other.stream_chat(USER, model="client-idem", idempotency_key=key)]
                again = [e async for e in other.stream_chat(USER, model="client-idem", idempotency_key=key)]
                assert first == again
            return events, stream.retries, stream.resumes, first

    events, retries, resumes, keyed = asyncio.run(run())
    assert dropping_proxy.cut.is_set() and dropping_proxy.connections == 2
    assert (retries, resumes) == (1, 0), "one POST retried before any answer: not a resume"
    assert_equals_replay(events, gateways[1])
    assert requests_for_model(cluster, "client-idem") == 2, "the retried POST and the keyed pair made one each"
    assert keyed[0].request_id != events[0].request_id


def test_the_blocking_client_streams_a_completion_and_resumes(gateways: list[Gateway]) -> None:
    with Client([g.url for g in gateways], inter_token_timeout_s=0.25, backoff=FAST_RETRY) as client:
        with client.stream_completion("once upon a time", model="client-sync", max_tokens=3, seed=2) as stream:
            events = list(stream)
        assert stream.resumes >= 2 and stream.finish_reason == "length"
        assert stream.request_id is not None
        status = client.status(stream.request_id)
    assert status.state == "done" and status.usage is not None and status.usage.completion_tokens == 3
    assert events[0].chunk["object"] == "text_completion"
    assert_equals_replay(events, gateways[1])
    assert len("".join(e.text for e in events).split()) == 3
