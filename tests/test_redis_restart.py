"""Redis restarted under load, on the same address from its append-only file: once it answers again every new
request succeeds (no 503 from a connection pooled before the restart), streams in flight finish whole (live or
by resuming), live workers keep their requests (no takeover because the restored leases looked idle), and no
task dies unobserved."""

from __future__ import annotations

import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support import Cluster, Gateway, chat_body, wait_for, wait_for_model
from tests.test_failover import assert_complete, read_resuming, stored
from tokenspool.redis_server import EmbeddedRedis, free_port

MODEL = "restart-sim"
LEASE = {"lease_timeout_s": 2.0, "worker_heartbeat_s": 0.2}
"""Short leases, so that an outage longer than a lease is quick to stage; not shorter, because a live
holder must renew within a lease of Redis answering again (reconnecting with backoff, on a machine that
two test runs load: a 1 s lease was once taken from a live worker there)."""
OUTAGE_S = 2.5
"""How long Redis stays down: longer than a lease, so every restored pending entry looks abandoned by its
idle time alone (this is the fault staged, not a wait for a condition)."""
NEW_STREAMS = 20


def new_stream_status(gateway: Gateway, i: int) -> str:
    """The answer to one new streaming request: its status, or "incomplete" for a 200 without [DONE]."""
    body = chat_body(f"after the restart {i}", max_tokens=4, model=MODEL, seed=i)
    with httpx.Client(timeout=30) as http:
        response = http.post(gateway.url + "/v1/chat/completions", json=body)
    if response.status_code == 200 and "data: [DONE]" not in response.text:
        return "incomplete"
    return str(response.status_code)


@pytest.mark.single_server(reason="it kills and restarts its own server from its append-only file")
@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_redis_restart_is_invisible_once_redis_answers_again(tmp_path: Path, stop_signal: signal.Signals) -> None:
    port = free_port()
    data = tmp_path / "aof"

    def redis_server() -> EmbeddedRedis:
        return EmbeddedRedis(port, data_dir=data, appendonly=True, appendfsync="always")

    server = redis_server().start()
    cluster = Cluster(server.url, tmp_path)
    try:
        for _ in range(2):
            cluster.worker(model=MODEL, sim_itl_ms=20, sim_ttft_ms=10, sim_default_max_tokens=1000, **LEASE)
        gateway = cluster.gateway()
        wait_for_model(gateway, MODEL)
        with ThreadPoolExecutor(max_workers=NEW_STREAMS + 6) as pool:
            # Fill the gateway's pool with connections that the restart will break.
            warm = Counter(pool.map(lambda i: new_stream_status(gateway, i), range(NEW_STREAMS)))
            assert warm == {"200": NEW_STREAMS}, warm
            in_flight = [
                pool.submit(read_resuming, gateway, chat_body(f"through the restart {i}", max_tokens=120, model=MODEL))
                for i in range(6)
            ]

            def all_running() -> bool:
                states = [cluster.meta(key.decode().split(":")[3]) for key in cluster.redis.keys("ts:*:r:*:meta")]
                return sum(s.get("state") == "running" and int(s.get("last_seq", 0)) > 0 for s in states) >= 6

            wait_for(all_running, 20, "six streams to be running")
            assert server.process is not None
            server.process.send_signal(stop_signal)
            server.process.wait()
            server.process = None
            time.sleep(OUTAGE_S)
            server = redis_server().start()  # returns once it answers PING
            after = Counter(pool.map(lambda i: new_stream_status(gateway, i), range(NEW_STREAMS)))
            results = [future.result(timeout=120) for future in in_flight]
        assert after == {"200": NEW_STREAMS}, f"new streams once Redis answered again: {dict(after)}"
        for request_id, ids, _resumes in results:
            kinds = [event.kind for event in stored(cluster, request_id)]
            assert "handover" not in kinds, f"{request_id} was taken from a live worker after the restart"
            assert_complete(cluster, request_id, ids, 120)
        for proc in cluster.procs:
            assert proc.alive(), f"{proc.name} exited:\n{proc.log()[-4000:]}"
            assert "never retrieved" not in proc.log(), f"{proc.name} let a task die unobserved:\n{proc.log()[-4000:]}"
            assert "taken over" not in proc.log(), f"{proc.name} took over a live worker's request"
    finally:
        cluster.close()
        server.stop()
