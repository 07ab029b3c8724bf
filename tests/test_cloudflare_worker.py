"""The Cloudflare Worker relay (ops/cloudflare/worker.js) run by real workerd in front of a real gateway:
streams pass through as they are produced, resume works through it, and errors come back as JSON."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import (
    EVENT_STREAM,
    Cluster,
    Gateway,
    SSEEvent,
    chat_body,
    content_of,
    iter_sse,
    read_stream,
    wait_for,
    wait_for_model,
)
from tokenspool.redis_server import free_port
from tokenspool.shared import keys

CLOUDFLARE_DIR = Path(__file__).resolve().parents[1] / "ops" / "cloudflare"
WORKERD = CLOUDFLARE_DIR / "node_modules" / ".bin" / "workerd"
MODEL = "cf-relay-sim"
GRACE_S = 1.0  # the gateway cancels a request nobody has read for this long


@dataclass
class Relay:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


@contextlib.contextmanager
def run_workerd(origin: str, log_path: Path) -> Iterator[Relay]:
    """workerd serving worker.js (config ops/cloudflare/workerd.capnp) on a free port, relaying to ``origin``."""
    if not os.access(WORKERD, os.X_OK):
        pytest.fail(f"workerd is not installed at {WORKERD}: run `npm ci --prefix ops/cloudflare`")
    port = free_port()
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [str(WORKERD), "serve", "workerd.capnp", "--socket-addr", f"http=127.0.0.1:{port}"],
            cwd=CLOUDFLARE_DIR,
            env={**os.environ, "ORIGIN": origin},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    relay = Relay(f"http://127.0.0.1:{port}", process, log_path)
    try:

        def listening() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"workerd exited with {process.returncode}:\n{relay.log()}")
            return port_open(port)

        wait_for(listening, 30, "workerd to listen")
        yield relay
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def gateway(cluster: Cluster) -> Gateway:
    """One gateway and one sim worker slow enough (40 ms a token) that a stream visibly takes time."""
    cluster.worker(
        model=MODEL,
        sim_itl_ms=40,
        sim_ttft_ms=10,
        sim_default_max_tokens=2000,
        worker_heartbeat_s=0.2,
        disconnect_grace_s=GRACE_S,
    )
    gateway = cluster.gateway(attach_refresh_s=0.2, disconnect_grace_s=GRACE_S)
    wait_for_model(gateway, MODEL)
    return gateway


@pytest.fixture(scope="module")
def relay(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with run_workerd(gateway.url, tmp_path_factory.mktemp("workerd") / "workerd.log") as relay:
        yield relay


def stream_through(
    relay: Relay, body: dict[str, object], *, leave_after: int | None = None
) -> tuple[str, list[SSEEvent]]:
    """POST a streaming chat completion through the Worker; (request id, events up to [DONE] or ``leave_after``)."""
    events: list[SSEEvent] = []
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", relay.url + "/v1/chat/completions", json=body, headers=EVENT_STREAM) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        for item in iter_sse(resp):
            if isinstance(item, SSEEvent):
                events.append(item)
                if item.data == "[DONE]" or len(events) == leave_after:
                    break
        return resp.headers["x-request-id"], events


def test_a_stream_arrives_through_the_worker_as_it_is_produced(
    cluster: Cluster, gateway: Gateway, relay: Relay
) -> None:
    body = chat_body("through the edge", max_tokens=15, model=MODEL)
    events: list[SSEEvent] = []
    produced_at_first_event: dict[str, str] = {}
    arrivals: list[float] = []
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", relay.url + "/v1/chat/completions", json=body, headers=EVENT_STREAM) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-accel-buffering"] == "no"
        request_id = resp.headers["x-request-id"]
        for item in iter_sse(resp):
            if not isinstance(item, SSEEvent):
                continue
            if not events:
                produced_at_first_event = cluster.meta(request_id)
            events.append(item)
            arrivals.append(time.monotonic())
            if item.data == "[DONE]":
                break
    assert events[-1].data == "[DONE]" and len(events) == 15 + 1
    # The first event reached the client while the worker was still generating: nothing was buffered.
    assert produced_at_first_event["state"] == "running", produced_at_first_event
    assert int(produced_at_first_event["last_seq"]) < 15
    assert arrivals[-1] - arrivals[0] > 0.2, "the events arrived in one burst"
    assert [e.id for e in events[:-1]] == [keys.event_id(request_id, n) for n in range(1, 16)]
    stored = read_stream("GET", f"{gateway.url}/v1/requests/{request_id}/events")
    assert [e.raw for e in events] == [e.raw for e in stored.events]
    assert content_of(events) == content_of(stored.events) and len(content_of(events).split()) == 15


@pytest.mark.parametrize("how", ["header", "query"])
def test_resume_through_the_worker_gets_exactly_the_rest(
    cluster: Cluster, gateway: Gateway, relay: Relay, how: str
) -> None:
    request_id, head = stream_through(relay, chat_body(f"resume by {how}", max_tokens=20, model=MODEL), leave_after=5)
    last_id = head[-1].id or ""
    url = f"{relay.url}/v1/requests/{request_id}/events"
    if how == "header":
        tail = read_stream("GET", url, headers={"Last-Event-ID": last_id})
    else:
        tail = read_stream("GET", url, params={"last_event_id": last_id})
    assert tail.headers is not None and tail.headers["x-request-id"] == request_id
    ids = [e.id for e in head + tail.events[:-1]]
    assert ids == [keys.event_id(request_id, n) for n in range(1, 21)], "gap or duplicate"
    assert tail.events[-1].data == "[DONE]"
    stored = read_stream("GET", f"{gateway.url}/v1/requests/{request_id}/events")
    assert [e.raw for e in head + tail.events] == [e.raw for e in stored.events]
    assert cluster.meta(request_id)["state"] == "done"


def test_a_client_that_leaves_the_worker_is_seen_leaving_by_the_gateway(cluster: Cluster, relay: Relay) -> None:
    """The disconnect travels through the Worker: the gateway cancels the abandoned request after its grace."""
    request_id, _ = stream_through(
        relay, chat_body("abandoned at the edge", max_tokens=1500, model=MODEL), leave_after=2
    )
    wait_for(lambda: cluster.meta(request_id).get("state") == "cancelled", 10, "the abandoned request to be cancelled")


def test_gateway_errors_pass_through_unchanged(gateway: Gateway, relay: Relay) -> None:
    invalid = b'{"model": "cf-relay-sim", "messages": ['
    headers = {"Content-Type": "application/json"}
    through = httpx.post(relay.url + "/v1/chat/completions", content=invalid, headers=headers)
    direct = httpx.post(gateway.url + "/v1/chat/completions", content=invalid, headers=headers)
    assert through.status_code == direct.status_code == 400
    assert through.headers["content-type"] == "application/json"
    assert through.content == direct.content and through.json()["error"]["code"] == "invalid_json"
    for path, status in [("/v1/requests/not-an-id/events", 404), (f"/v1/requests/{keys.new_request_id('chat')}", 404)]:
        through, direct = httpx.get(relay.url + path), httpx.get(gateway.url + path)
        assert through.status_code == direct.status_code == status and through.content == direct.content


def test_an_unreachable_origin_is_a_502_json_error(tmp_path: Path) -> None:
    with run_workerd(f"http://127.0.0.1:{free_port()}", tmp_path / "workerd.log") as relay:
        for response in (
            httpx.post(relay.url + "/v1/chat/completions", json=chat_body(model=MODEL)),
            httpx.get(relay.url + "/v1/requests/x/events", headers={"Last-Event-ID": "x:1"}),
        ):
            assert response.status_code == 502
            assert response.headers["content-type"].startswith("application/json")
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "server_error" and error["code"] == "origin_unreachable"
        assert httpx.get(relay.url + "/healthz").status_code == 404


def test_wrangler_deploys_what_the_tests_run() -> None:
    """wrangler.toml (for deploying) and workerd.capnp (what these tests run) describe the same Worker."""
    wrangler = tomllib.loads((CLOUDFLARE_DIR / "wrangler.toml").read_text())
    capnp = (CLOUDFLARE_DIR / "workerd.capnp").read_text()
    date = re.search(r'compatibilityDate = "([^"]+)"', capnp)
    flags = re.search(r"compatibilityFlags = \[([^\]]*)\]", capnp)
    assert date and flags
    assert wrangler["compatibility_date"] == date.group(1)
    assert wrangler["compatibility_flags"] == re.findall(r'"([^"]+)"', flags.group(1))
    assert wrangler["main"] == "worker.js" and 'embed "worker.js"' in capnp
    assert "ORIGIN" in wrangler["vars"] and 'name = "ORIGIN"' in capnp
