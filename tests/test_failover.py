"""Workers that die, stall or keep dying: the stream goes on from its emitted tokens, once and in order."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import (
    EVENT_STREAM,
    Cluster,
    Gateway,
    Worker,
    chat_body,
    clean_env,
    content_of,
    iter_sse,
    read_stream,
    wait_for,
    wait_for_model,
)
from tokenspool.shared import handover, keys, wire

MODEL = "failover-sim"
FAST_LEASE_NO_SIM = {"lease_timeout_s": 1.0, "worker_heartbeat_s": 0.2}
FAST_LEASE = {**FAST_LEASE_NO_SIM, "sim_itl_ms": 10, "sim_ttft_ms": 10}


@pytest.fixture(scope="module")
def gateway(cluster: Cluster) -> Gateway:
    return cluster.gateway()


def start_worker(cluster: Cluster, gateway: Gateway, *, wait: bool = True, **extra: object) -> Worker:
    worker = cluster.worker(model=MODEL, wait=wait, **FAST_LEASE, **extra)
    if wait:
        wait_for_model(gateway, MODEL)
    return worker


def stop_all_workers(cluster: Cluster) -> None:
    for proc in cluster.procs:
        if proc.argv[0] == "worker" and proc.alive():
            proc.stop()


def stored(cluster: Cluster, request_id: str) -> list[wire.Event]:
    entries = cluster.redis.xrange(keys.RequestKeys.of(request_id).events)
    return [wire.decode(fields[b"d"], wire.Event) for _id, fields in entries]  # type: ignore[union-attr]


def assert_complete(cluster: Cluster, request_id: str, ids: list[str | None], max_tokens: int) -> None:
    data_ids = [i for i in ids if i is not None]
    events = stored(cluster, request_id)
    expected = [
        keys.event_id(request_id, n) for n, e in enumerate(events, 1) if e.kind != "handover" and e.kind != "end"
    ]
    assert data_ids == expected, "lost, duplicated or out-of-order events"
    assert sum(len(e.token_ids) for e in events if e.kind == "delta") == max_tokens
    assert events[-1].kind == "end" and events[-1].completion_tokens == max_tokens


def test_worker_killed_mid_stream_is_continued_by_another(cluster: Cluster, gateway: Gateway) -> None:
    rng = random.Random(20261124)
    workers = [start_worker(cluster, gateway), start_worker(cluster, gateway)]
    gaps: list[float] = []
    trial = attempts = 0
    while trial < 20:
        attempts += 1
        assert attempts <= 40, "most requests ended before the client had read to the kill point"
        max_tokens = 40
        body = chat_body(f"failover trial {trial}", max_tokens=max_tokens, model=MODEL, seed=trial)
        kill_after = rng.randint(1, max_tokens - 5)
        seen: list[str | None] = []
        comments: list[str] = []
        ended_before_the_kill = False
        with (
            httpx.Client(timeout=30) as http,
            http.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=EVENT_STREAM) as response,
        ):
            request_id = response.headers["x-request-id"]
            killed_at = 0.0
            for item in iter_sse(response):
                if isinstance(item, str):
                    comments.append(item)
                    continue
                if item.data == "[DONE]":
                    break
                if killed_at and len(gaps) == trial:
                    gaps.append(time.monotonic() - killed_at)
                seen.append(item.id)
                if len(seen) == kill_after:
                    holder = cluster.meta(request_id)["worker"]
                    victim = next(w for w in workers if w.worker_id == holder)
                    victim.proc.kill()  # and reaped: from here on it writes nothing
                    # On a loaded machine the worker may have written the whole reply before this client read
                    # this far: then nothing was left to take over, and the trial is run again.
                    ended_before_the_kill = cluster.meta(request_id)["state"] != "running"
                    killed_at = 0.0 if ended_before_the_kill else time.monotonic()
                    workers.remove(victim)
                    workers.append(start_worker(cluster, gateway, wait=False))
        assert_complete(cluster, request_id, seen, max_tokens)
        if ended_before_the_kill:
            continue
        notices = [notice for c in comments if (notice := handover.parse_comment(c)) is not None]
        handover_seq = next(n for n, e in enumerate(stored(cluster, request_id), 1) if e.kind == "handover")
        assert [n.seq for n in notices] == [handover_seq], "the handover is visible as a comment naming its seq"
        assert notices[0].message.startswith("continued by worker")
        meta = cluster.meta(request_id)
        assert meta["state"] == "done" and int(meta["attempt"]) == 2
        if trial % 5 == 0:
            uninterrupted = read_stream("POST", gateway.url + "/v1/chat/completions", json=body)
            replay = read_stream("GET", f"{gateway.url}/v1/requests/{request_id}/events")
            assert content_of(replay.events) == content_of(uninterrupted.events)
        trial += 1
    assert len(gaps) == 20 and max(gaps) < 10, gaps
    print(f"failover gap p50 {sorted(gaps)[10]:.3f}s max {max(gaps):.3f}s over 20 kills")


def test_stalled_worker_resumed_after_losing_its_lease_cannot_write(cluster: Cluster, gateway: Gateway) -> None:
    stop_all_workers(cluster)
    first = start_worker(cluster, gateway)
    second = start_worker(cluster, gateway)
    body = chat_body("stall me", max_tokens=60, model=MODEL, seed=5)
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=EVENT_STREAM) as response,
    ):
        request_id = response.headers["x-request-id"]
        events = iter_sse(response)
        seen = [next(item for item in events if not isinstance(item, str)) for _ in range(5)]
        holder = cluster.meta(request_id)["worker"]
        stalled = first if holder == first.worker_id else second
        stalled.proc.signal(signal.SIGSTOP)
        wait_for(lambda: cluster.meta(request_id).get("attempt") == "2", 15, "another worker to take over")
        stalled.proc.signal(signal.SIGCONT)
        seen += [item for item in events if not isinstance(item, str)]
    assert seen[-1].data == "[DONE]"
    assert_complete(cluster, request_id, [e.id for e in seen[:-1]], 60)
    wait_for(lambda: "abandoned by this worker" in stalled.proc.log(), 10, "the stale worker to stand down")
    assert stalled.proc.alive(), "a fenced worker goes on serving"
    # The new holder acknowledges the entry just after the end event the client has read (a round trip
    # later, which on a cluster is a pipeline to another node): wait for it rather than race it.
    wait_for(
        lambda: cluster.redis.xpending(keys.queue_key(MODEL), keys.WORKER_GROUP)["pending"] == 0,
        5,
        "the queue entry to be acknowledged by its new holder",
    )
    again = read_stream(
        "POST", gateway.url + "/v1/chat/completions", json=chat_body("after the stall", max_tokens=5, model=MODEL)
    )
    assert again.events[-1].data == "[DONE]"


def test_a_request_that_keeps_killing_workers_is_dead_lettered(cluster: Cluster, gateway: Gateway) -> None:
    stop_all_workers(cluster)
    gateway = cluster.gateway(heartbeat_s=0.2)  # its pings wake the loop below when a worker died
    poison_settings = {"sim_crash_marker": "POISON", "max_attempts": 3}
    start_worker(cluster, gateway, **poison_settings)
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST",
            gateway.url + "/v1/chat/completions",
            json=chat_body("POISON pill", max_tokens=30, model=MODEL),
            headers=EVENT_STREAM,
        ) as response,
    ):
        request_id = response.headers["x-request-id"]
        deaths = 0
        items = []
        for item in iter_sse(response):
            items.append(item)
            if not isinstance(item, str) and item.data == "[DONE]":
                break
            alive = [p for p in cluster.procs if p.argv[0] == "worker" and p.alive()]
            if not alive and deaths < 4:
                deaths += 1
                start_worker(cluster, gateway, **poison_settings)
    data = [i for i in items if not isinstance(i, str)]
    error = data[-2].json()["error"]
    assert error["type"] == "failed" and "gave up after 3 attempts" in error["message"]
    assert cluster.meta(request_id)["state"] == "failed"
    # The terminal event is written first; the dead letter and the queue entry's acknowledgement follow it
    # (the client may read [DONE] before they land): wait for them, then check them exactly.
    wait_for(
        lambda: (
            cluster.redis.xpending(keys.queue_key(MODEL), keys.WORKER_GROUP)["pending"] == 0
            and cluster.redis.xlen(keys.dead_letter_key(MODEL)) > 0
        ),
        10,
        "the dead letter and the acknowledgement",
    )
    dead = cluster.redis.xrange(keys.dead_letter_key(MODEL))
    assert [fields[b"request_id"].decode() for _id, fields in dead] == [request_id]  # type: ignore[union-attr]
    status = subprocess.run(
        [sys.executable, "-m", "tokenspool", "status", "--json"],
        env=clean_env(cluster.redis_url),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["models"][MODEL]["dead_letters"] == 1 and report["models"][MODEL]["running"] == 0
    assert any(w["model"] == MODEL and w["state"] == "active" for w in report["workers"])
    table = subprocess.run(
        [sys.executable, "-m", "tokenspool", "status"],
        env=clean_env(cluster.redis_url),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "DEAD LETTERS" in table.stdout and MODEL in table.stdout


@pytest.mark.single_server(reason="it restarts its own server empty at the same address")
def test_redis_losing_its_data_ends_open_streams_and_workers_recover(tmp_path: Path) -> None:
    from tokenspool.redis_server import EmbeddedRedis, free_port

    port = free_port()
    server = EmbeddedRedis(port).start()
    cluster = Cluster(server.url, tmp_path)
    try:
        cluster.worker(model="amnesia", sim_itl_ms=200, worker_heartbeat_s=0.2)
        gateway = cluster.gateway(heartbeat_s=0.3)
        wait_for_model(gateway, "amnesia")
        with (
            httpx.Client(timeout=30) as http,
            http.stream(
                "POST",
                gateway.url + "/v1/chat/completions",
                json=chat_body("forget me", max_tokens=200, model="amnesia"),
                headers=EVENT_STREAM,
            ) as response,
        ):
            events = iter_sse(response)
            first = next(item for item in events if not isinstance(item, str))
            server.stop()
            server = EmbeddedRedis(port).start()  # same address, no data: a restart without persistence
            rest = [item for item in events if not isinstance(item, str)]
        assert first.id is not None and rest[-1].data == "[DONE]"
        error = rest[-2].json()["error"]
        assert error["type"] in ("events_expired", "redis_unavailable"), error
        # Workers re-register and recreate their consumer group; new requests are served again.
        wait_for_model(gateway, "amnesia", 15)
        again = read_stream(
            "POST", gateway.url + "/v1/chat/completions", json=chat_body("remember this", max_tokens=3, model="amnesia")
        )
        assert again.events[-1].data == "[DONE]" and len(again.events) == 4
        assert all(p.alive() for p in cluster.procs), "no process crashed"
    finally:
        cluster.close()
        server.stop()


def read_resuming(gateway: Gateway, body: dict[str, object]) -> tuple[str, list[str | None], int]:
    """Read a stream to its end as a resilient client does: on an error event or a dropped connection,
    resume from the last event id. (request id, data event ids, resumes)."""
    ids: list[str | None] = []

    def read_until_done(response: httpx.Response) -> bool:
        """Collect event ids; True at [DONE], False at an out-of-band error (Redis unavailable)."""
        for item in iter_sse(response):
            if isinstance(item, str):
                continue
            if item.data == "[DONE]":
                return True
            if item.id is None:
                return False
            ids.append(item.id)
        return False

    resumes = 0
    done = False
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=EVENT_STREAM) as response:
            request_id = response.headers["x-request-id"]
            with contextlib.suppress(httpx.HTTPError):  # dropped: resume below
                done = read_until_done(response)
        while not done:
            resumes += 1
            assert resumes < 50, "could not finish the stream"
            headers = {"Last-Event-ID": ids[-1]} if ids and ids[-1] else {}
            try:
                with http.stream("GET", f"{gateway.url}/v1/requests/{request_id}/events", headers=headers) as response:
                    if response.status_code == 204:  # the request had ended at the last event read
                        done = True
                        continue
                    if response.status_code == 200:
                        done = read_until_done(response)
                        continue
            except httpx.HTTPError:
                pass  # Redis or the gateway not back yet: retry
            time.sleep(0.2)
    return request_id, ids, resumes


@pytest.mark.single_server(reason="it kills and restarts its own server from its append-only file")
def test_redis_killed_and_restarted_with_aof_loses_no_acknowledged_event(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tokenspool.redis_server import EmbeddedRedis, free_port

    port = free_port()
    data = tmp_path / "aof"
    server = EmbeddedRedis(port, data_dir=data, appendonly=True, appendfsync="always").start()
    cluster = Cluster(server.url, tmp_path)
    try:
        cluster.worker(model="durable", sim_itl_ms=20, sim_default_max_tokens=1000, **FAST_LEASE_NO_SIM)
        cluster.worker(model="durable", sim_itl_ms=20, sim_default_max_tokens=1000, **FAST_LEASE_NO_SIM)
        gateway = cluster.gateway()
        wait_for_model(gateway, "durable")
        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [
                pool.submit(read_resuming, gateway, chat_body(f"durable {i}", max_tokens=120, model="durable", seed=i))
                for i in range(6)
            ]
            wait_for(lambda: cluster.redis.dbsize() > 10, 10, "traffic")
            time.sleep(0.5)
            server.process.kill()  # type: ignore[union-attr]
            server.process.wait()  # type: ignore[union-attr]
            time.sleep(0.5)
            server = EmbeddedRedis(port, data_dir=data, appendonly=True, appendfsync="always").start()
            results = [f.result(timeout=120) for f in futures]
        for request_id, ids, _resumes in results:
            assert_complete(cluster, request_id, ids, 120)
    finally:
        cluster.close()
        server.stop()


def test_checker_classifies_lost_duplicated_and_out_of_order_events() -> None:
    from tokenspool.checker import classify

    rid = keys.new_request_id("chat")
    stored = [
        wire.Event("delta", "a", (1,)),
        wire.Event("handover", message="x"),
        wire.Event("delta", "b", (2,)),
        wire.Event("end", finish_reason="length", completion_tokens=2),
    ]
    ids = [keys.event_id(rid, 1), keys.event_id(rid, 3)]
    assert classify(rid, ids, stored, 2) == "ok"
    assert classify(rid, ids[:1], stored, 2) == "lost"
    assert classify(rid, [ids[0], ids[0], ids[1]], stored, 2) == "duplicated"
    assert classify(rid, list(reversed(ids)), stored, 2) == "out_of_order"
    assert classify(rid, ids, stored[:-1], 2) == "lost", "a stream without its end event is cut short"
    assert classify(rid, ids, stored, 3) == "lost", "fewer tokens than max_tokens"


@pytest.mark.single_server(
    reason="`tokenspool soak` starts its own server; test_redis_cluster.py runs it with --redis-cluster 3"
)
def test_soak_command_kills_workers_and_reports_only_ok(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tokenspool", "soak", "--trials", "3", "--streams", "3", "--log-dir", str(tmp_path)],
        env=clean_env(None),
        capture_output=True,
        text=True,
        timeout=240,
    )
    logs = "".join(f"\n== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert "did not stop" not in result.stderr, logs
    assert "verdicts: ok 9" in result.stdout and "failover gap" in result.stdout
