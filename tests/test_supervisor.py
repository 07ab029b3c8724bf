"""`tokenspool up` supervises: a gateway, a worker or the embedded server that dies is restarted, and the
stack goes on serving through its one shared port, clients resuming where they were.

One `up` (two gateways, one worker, the embedded server) serves the module; each test kills one of its
processes with SIGKILL and waits until `up` has started it again.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Proc, clean_env, wait_for
from tokenspool.client import Client
from tokenspool.redis_server import free_port
from tokenspool.supervisor import RestartPolicy, Supervised, Supervisor, describe_exit

MODEL = "tokenspool-sim"
PROMPT = [{"role": "user", "content": "a stream that outlives its processes"}]


class Up:
    def __init__(self, proc: Proc, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def children(self, role: str) -> list[int]:
        """The pids of `up`'s children whose command line names ``role`` (gateway, worker, valkey-server)."""
        pids = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                if role in cmdline:
                    pids.append(int(child))
        return pids

    def restarted(self, name: str, count: int) -> bool:
        return len(re.findall(rf"restarted {name} \(pid \d+\)", self.proc.log())) >= count

    def whole(self) -> bool:
        return len(self.children("gateway")) == 2 and len(self.children("worker")) == 1


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    port = free_port()
    argv = ["up", "--port", str(port), "--gateways", "2", "--workers", "1"]
    # Worker settings as flags of `up`: tokens every 40 ms, and a dead worker's requests taken over after 1 s.
    argv += ["--sim-itl-ms", "40", "--lease-timeout-s", "1", "--worker-heartbeat-s", "0.5"]
    proc = Proc(argv, tmp_path_factory.mktemp("up") / "up.log", clean_env(None))
    try:
        wait_for(lambda: "tokenspool is up at" in proc.log() or not proc.alive(), 60, "the stack to start")
        assert proc.alive(), proc.log()
        yield Up(proc, port)
        proc.process.send_signal(signal.SIGINT)
        assert proc.process.wait(60) == 0, proc.log()[-3000:]
    finally:
        if proc.alive():
            proc.kill()


def holder_of_connection(pids: list[int], port: int) -> int:
    """The one process among ``pids`` that holds an established TCP connection on local port ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
                inodes.add(fields[9])
    sockets = {f"socket:[{inode}]" for inode in inodes}
    holders = {pid for pid in pids for fd in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(fd) in sockets}
    assert len(holders) == 1, f"expected one gateway holding the stream, found {holders}"
    return holders.pop()


def uninterrupted_text(up: Up, max_tokens: int) -> str:
    with Client([up.url]) as client, client.stream_chat(PROMPT, model=MODEL, max_tokens=max_tokens) as stream:
        return stream.text()


def test_a_gateway_killed_mid_stream_is_restarted_and_the_client_resumes_through_the_shared_port(up: Up) -> None:
    wait_for(up.whole, 30, "two gateways and a worker")
    gateways = up.children("gateway")
    restarts_before = len(re.findall(r"restarted gateway", up.proc.log()))
    texts = []
    with Client([up.url]) as client, client.stream_chat(PROMPT, model=MODEL, max_tokens=60) as stream:
        for event in stream:
            texts.append(event.text)
            if len(texts) == 5:
                victim = holder_of_connection(gateways, up.port)
                os.kill(victim, signal.SIGKILL)
        assert stream.resumes >= 1, "the stream went on over a new connection"
        assert stream.finish_reason == "length"
        assert stream.usage is not None and stream.usage.completion_tokens == 60
    assert "".join(texts) == uninterrupted_text(up, 60), "nothing lost, nothing twice"
    wait_for(lambda: len(re.findall(r"restarted gateway", up.proc.log())) > restarts_before, 30, "the restart")
    assert f"(pid {victim}) was killed by SIGKILL" in up.proc.log()
    wait_for(up.whole, 30, "two gateways again")
    assert victim not in up.children("gateway")


def test_a_killed_worker_is_restarted_and_its_stream_finishes(up: Up) -> None:
    wait_for(up.whole, 30, "two gateways and a worker")
    (worker,) = up.children("worker")
    texts = []
    with Client([up.url]) as client, client.stream_chat(PROMPT, model=MODEL, max_tokens=50) as stream:
        for event in stream:
            texts.append(event.text)
            if len(texts) == 5:
                os.kill(worker, signal.SIGKILL)  # the only worker: its restart continues the request
        assert stream.finish_reason == "length"
        assert stream.usage is not None and stream.usage.completion_tokens == 50
    assert "".join(texts) == uninterrupted_text(up, 50)
    assert f"worker0 (pid {worker}) was killed by SIGKILL" in up.proc.log()
    assert up.restarted("worker0", 1)
    assert up.children("worker") != [worker]


def test_the_embedded_server_killed_comes_back_with_its_data_and_requests_work_after(up: Up) -> None:
    wait_for(up.whole, 30, "two gateways and a worker")
    before = httpx.post(
        up.url + "/v1/chat/completions", json={"model": MODEL, "messages": PROMPT, "max_tokens": 3}, timeout=30
    )
    assert before.status_code == 200
    request_id = before.json()["id"]
    replay = httpx.get(f"{up.url}/v1/requests/{request_id}/events", timeout=30).text
    (server,) = up.children("valkey-server")
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: up.restarted("the embedded server", 1), 30, "the server's restart")
    assert f"the embedded server (pid {server}) was killed by SIGKILL" in up.proc.log()

    def answered(method: str, path: str, **kwargs: object) -> httpx.Response:
        # Gateways and workers reconnect on their own; a connection that a pool held across the restart fails
        # its first call (503 redis_unavailable), so each call is tried until it succeeds.
        def ok() -> httpx.Response | None:
            response = httpx.request(method, up.url + path, timeout=30, **kwargs)  # type: ignore[arg-type]
            return response if response.status_code == 200 else None

        return wait_for(ok, 30, f"{method} {path} to succeed after the restart", interval_s=0.2)

    after = answered("POST", "/v1/chat/completions", json={"model": MODEL, "messages": PROMPT, "max_tokens": 3})
    assert after.json()["usage"]["completion_tokens"] == 3
    # The append-only file brought back what the server had acknowledged: the earlier request replays the same.
    assert answered("GET", f"/v1/requests/{request_id}/events").text == replay
    assert up.whole() and len(up.children("valkey-server")) == 1


def test_restart_delays_double_up_to_a_bound_and_reset_after_a_healthy_run() -> None:
    policy = RestartPolicy(first_delay_s=0.5, max_delay_s=4.0, healthy_after_s=60.0)
    delays = []
    delay = None
    for _ in range(6):
        delay = policy.delay_s(delay, ran_s=1.0)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.delay_s(4.0, ran_s=60.0) == 0.5


def test_a_crash_loop_is_restarted_later_each_time_and_a_drained_worker_is_not_restarted() -> None:
    now = [0.0]
    lines: list[str] = []
    exits = {"crashing": 1, "drained": 0}
    started = {"crashing": 0, "drained": 0}

    def child(name: str, final: bool) -> Supervised:
        return Supervised(
            name,
            pid=lambda: 100,
            returncode=lambda: exits[name],
            start_again=lambda: started.__setitem__(name, started[name] + 1),
            clean_exit_is_final=final,
        )

    supervisor = Supervisor(
        [child("crashing", False), child("drained", True)],
        RestartPolicy(first_delay_s=1.0, max_delay_s=8.0, healthy_after_s=100.0),
        say=lines.append,
        clock=lambda: now[0],
    )
    restart_times = []
    while now[0] < 30:
        before = started["crashing"]
        supervisor.check()
        if started["crashing"] > before:
            restart_times.append(now[0])
        now[0] += 0.25
    gaps = [later - earlier for earlier, later in itertools.pairwise(restart_times)]
    # Each gap is the delay plus the quarter second in which the restarted process "ran" before it crashed.
    assert [gap - 0.25 for gap in gaps] == [2.0, 4.0, 8.0, 8.0], restart_times
    assert started["drained"] == 0
    assert "drained (pid 100) exited with code 0 after 0.0s (drained); not restarting it" in lines
    assert "crashing (pid 100) exited with code 1 after 0.0s; restarting it in 1.0s" in lines
    assert describe_exit(-9) == "was killed by SIGKILL"
