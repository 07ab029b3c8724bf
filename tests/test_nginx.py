"""The shipped ops/nginx.conf, run by a real nginx in front of two gateways: tokens stream through as
they are generated (no buffering), a resume through nginx continues exactly where the client stopped,
and a client whose gateway dies resumes through nginx on the other one."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
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
)
from tokenspool.redis_server import free_port
from tokenspool.stack import model_listed

REPO = Path(__file__).resolve().parent.parent
MODEL = "behind-nginx"
TOKENS = 30
ITL_MS = 40


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        pytest.fail("nginx is not installed: the test command (make test) installs Debian's package")
    return found


def render_config(gateways: list[Gateway], listen_port: int, work_dir: Path) -> Path:
    """ops/nginx.conf as shipped, with only its ports and pid file moved to this test's own."""
    text = (REPO / "ops" / "nginx.conf").read_text()
    upstreams = re.findall(r"server 127\.0\.0\.1:\d+;", text)
    assert len(upstreams) == 2, "ops/nginx.conf should list two gateways"
    for line, gateway in zip(upstreams, gateways, strict=True):
        text = text.replace(line, f"server {gateway.url.removeprefix('http://')};")
    text = re.sub(r"listen \d+;", f"listen 127.0.0.1:{listen_port};", text)
    text = re.sub(r"pid [^;]+;", f"pid {work_dir / 'nginx.pid'};", text)
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        text = text.replace("http {", f"http {{\n    {name}_temp_path {work_dir / name};", 1)
    config = work_dir / "nginx.conf"
    config.write_text(text)
    return config


@pytest.fixture(scope="module")
def proxied(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[Gateway]]]:
    cluster.worker(model=MODEL, sim_itl_ms=ITL_MS, sim_ttft_ms=20, lease_timeout_s=1.0, worker_heartbeat_s=0.2)
    gateways = [cluster.gateway(), cluster.gateway()]
    work_dir = tmp_path_factory.mktemp("nginx")
    port = free_port()
    config = render_config(gateways, port, work_dir)
    binary = nginx_binary()
    check = subprocess.run([binary, "-t", "-e", "stderr", "-c", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    log = open(work_dir / "nginx.log", "wb")  # noqa: SIM115 (closed in finally)
    nginx = subprocess.Popen(
        [binary, "-e", "stderr", "-c", str(config), "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            assert nginx.poll() is None, (work_dir / "nginx.log").read_text()
            return model_listed(url, MODEL)

        wait_for(answers, 20, "nginx to answer with the model listed")
        yield url, gateways
    finally:
        nginx.terminate()
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()
        log.close()


def test_tokens_arrive_through_nginx_as_they_are_generated(proxied: tuple[str, list[Gateway]]) -> None:
    url, _ = proxied
    arrivals: list[float] = []
    events: list[SSEEvent] = []
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST", url + "/v1/chat/completions", json=chat_body("live", max_tokens=TOKENS, model=MODEL)
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        for item in iter_sse(response):
            if isinstance(item, SSEEvent):
                arrivals.append(time.monotonic())
                events.append(item)
                if item.data == "[DONE]":
                    break
    assert len(events) == TOKENS + 1
    generation_s = (TOKENS - 1) * ITL_MS / 1000
    # Buffered, every event would arrive in one burst at the end; streamed, they spread over the generation.
    assert arrivals[-2] - arrivals[0] > 0.6 * generation_s, f"events arrived in a burst: {arrivals}"
    gaps = [b - a for a, b in itertools.pairwise(arrivals[:-1])]
    assert sorted(gaps)[len(gaps) // 2] > 0.25 * ITL_MS / 1000


def test_resume_through_nginx_returns_exactly_the_events_after_the_last_seen(
    proxied: tuple[str, list[Gateway]],
) -> None:
    url, _ = proxied
    whole = read_stream("POST", url + "/v1/chat/completions", json=chat_body("resume", max_tokens=12, model=MODEL))
    request_id = whole.headers["x-request-id"] if whole.headers else ""
    last_seen = whole.events[4].id or ""
    resumed = read_stream("GET", f"{url}/v1/requests/{request_id}/events", headers={"Last-Event-ID": last_seen})
    assert [e.id for e in resumed.events] == [e.id for e in whole.events[5:]]
    assert [e.data for e in resumed.events] == [e.data for e in whole.events[5:]]
    by_query = read_stream("GET", f"{url}/v1/requests/{request_id}/events", params={"last_event_id": last_seen})
    assert [e.data for e in by_query.events] == [e.data for e in whole.events[5:]]


def test_client_of_a_killed_gateway_resumes_through_nginx_on_the_other(
    cluster: Cluster, proxied: tuple[str, list[Gateway]]
) -> None:
    url, gateways = proxied
    seen: list[SSEEvent] = []
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            url + "/v1/chat/completions",
            json=chat_body("kill", max_tokens=TOKENS, model=MODEL),
            headers=EVENT_STREAM,
        ) as response,
    ):
        request_id = response.headers["x-request-id"]
        serving = wait_for(
            lambda: next((g for g in gateways if f"request {request_id} accepted" in g.proc.log()), None),
            10,
            "the gateway that accepted the request",
        )
        with pytest.raises(httpx.HTTPError):  # the connection breaks when its gateway dies
            for item in iter_sse(response):
                if isinstance(item, SSEEvent):
                    seen.append(item)
                    if len(seen) == 3:
                        serving.proc.kill()
    assert len(seen) >= 3
    rest = read_stream("GET", f"{url}/v1/requests/{request_id}/events", headers={"Last-Event-ID": seen[-1].id or ""})
    whole = read_stream("GET", f"{url}/v1/requests/{request_id}/events")
    assert [e.id for e in seen + rest.events] == [e.id for e in whole.events]
    assert content_of(seen + rest.events) == content_of(whole.events)
    assert rest.events[-1].data == "[DONE]"
