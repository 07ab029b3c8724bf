"""Secured Redis: the least-privilege ACL users of ops/redis/acl.conf (that very file, loaded by a real
server), passwords in the URL, and TLS (rediss://, verified with a CA file) through stunnel."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import redis_mode
from tests.support import (
    EVENT_STREAM,
    Cluster,
    Gateway,
    chat_body,
    clean_env,
    content_of,
    iter_sse,
    read_stream,
    wait_for_model,
)
from tests.tls import Certificates, TLSProxy, make_certificates
from tokenspool.redis_server import EmbeddedCluster, EmbeddedRedis
from tokenspool.shared import keys
from tokenspool.shared.redis_client import RedisTarget, connect_sync

ACL_FILE = Path(__file__).resolve().parent.parent / "ops" / "redis" / "acl.conf"
MODEL = "secured-sim"


@dataclass(frozen=True)
class Secured:
    port: int
    """The server's port (on a cluster: the seed node's)."""
    cluster: bool
    gateway_password: str
    worker_password: str
    admin_password: str

    def url(self, user: str, password: str, *, scheme: str = "redis", port: int | None = None) -> str:
        if self.cluster:
            scheme += "+cluster"
        return f"{scheme}://{user}:{password}@127.0.0.1:{port or self.port}/0"

    def gateway_url(self, **kwargs: object) -> str:
        return self.url("tokenspool-gateway", self.gateway_password, **kwargs)  # type: ignore[arg-type]

    def worker_url(self, **kwargs: object) -> str:
        return self.url("tokenspool-worker", self.worker_password, **kwargs)  # type: ignore[arg-type]

    @property
    def admin_url(self) -> str:
        return self.url("test-admin", self.admin_password)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """A server started with ops/redis/acl.conf, its placeholders replaced by random passwords, plus an
    administrative user of the test's own (the harness reads Redis to check what happened). With
    TOKENSPOOL_TEST_REDIS=cluster, a 3-node cluster whose every node loads the file."""
    directory = tmp_path_factory.mktemp("secured-redis")
    gateway_password, worker_password, admin_password = (secrets.token_hex(16) for _ in range(3))
    rules = ACL_FILE.read_text()
    assert "GATEWAY_PASSWORD_PLACEHOLDER" in rules and "WORKER_PASSWORD_PLACEHOLDER" in rules
    rules = rules.replace("GATEWAY_PASSWORD_PLACEHOLDER", gateway_password)
    rules = rules.replace("WORKER_PASSWORD_PLACEHOLDER", worker_password)
    acl_path = directory / "users.acl"
    acl_path.write_text(rules + f"user test-admin on >{admin_password} ~* &* +@all\n")
    passwords = (gateway_password, worker_password, admin_password)
    if redis_mode() == "cluster":
        with EmbeddedCluster(
            3,
            data_dir=directory / "data",
            extra_args=("--aclfile", str(acl_path)),
            admin=("test-admin", admin_password),
        ) as cluster:
            yield Secured(cluster.ports[0], True, *passwords)
        return
    with EmbeddedRedis(data_dir=directory / "data", extra_args=("--aclfile", str(acl_path))) as server:
        yield Secured(server.port, False, *passwords)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def denied_commands(admin: Any) -> list[str]:
    """What the server (every node of a cluster) refused anyone since the last reset (ACL LOG), as
    'user: command (reason)'."""
    if isinstance(admin, redis.RedisCluster):
        per_node = admin.execute_command("ACL LOG", target_nodes=redis.RedisCluster.ALL_NODES)
        entries = [dict(zip(e[::2], e[1::2], strict=True)) for log in per_node.values() for e in log]
        entries = [{k.decode(): v for k, v in e.items()} for e in entries]
    else:
        entries = admin.acl_log()
    return [f"{e.get('username')}: {e.get('object')} ({e.get('reason')})" for e in entries]  # type: ignore[union-attr]


def run_roles(stack: Cluster, gateway_env: dict[str, str], worker_env: dict[str, str]) -> Gateway:
    """One gateway and two workers, each process with its own ACL user."""
    for _ in range(2):
        stack.worker(model=MODEL, env=worker_env, sim_itl_ms=30, lease_timeout_s=0.5, worker_heartbeat_s=0.1)
    gateway = stack.gateway(env=gateway_env)
    wait_for_model(gateway, MODEL)
    return gateway


def exercise(stack: Cluster, gateway: Gateway) -> None:
    """Stream, resume, cancel, retry with an Idempotency-Key, and a worker killed mid-stream: every Redis
    operation either role makes in normal running and in a failover."""
    url = gateway.url + "/v1/chat/completions"
    first = read_stream(
        "POST", url, json=chat_body("secured", max_tokens=5, model=MODEL), headers={"Idempotency-Key": "k1"}
    )
    assert first.events[-1].data == "[DONE]" and content_of(first.events).count(" ") == 4
    request_id = first.headers["x-request-id"] if first.headers else ""
    again = read_stream(
        "POST", url, json=chat_body("secured", max_tokens=5, model=MODEL), headers={"Idempotency-Key": "k1"}
    )
    assert again.headers is not None and again.headers["x-request-id"] == request_id
    resumed = read_stream(
        "GET", f"{gateway.url}/v1/requests/{request_id}/events", headers={"Last-Event-ID": f"{request_id}:2"}
    )
    assert resumed.events[0].id == f"{request_id}:3" and resumed.events[-1].data == "[DONE]"
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST", url, json=chat_body("to cancel", max_tokens=500, model=MODEL), headers=EVENT_STREAM
        ) as response:
            cancel_id = response.headers["x-request-id"]
            events = iter_sse(response)
            first_event = next(item for item in events if not isinstance(item, str))
            # A second reader of the same request joins the partition reader while it blocks in XREAD:
            # the relay wakes it with CLIENT UNBLOCK (a grant the gateway user needs).
            joined = read_stream(
                "GET",
                f"{gateway.url}/v1/requests/{cancel_id}/events",
                headers={"Last-Event-ID": first_event.id},
                limit=3,
            )
            assert [e.id for e in joined.events] == [f"{cancel_id}:{n}" for n in (2, 3, 4)]
            assert http.delete(f"{gateway.url}/v1/requests/{cancel_id}").status_code == 202
            rest = [item for item in events if not isinstance(item, str)]
        assert rest[-2].json()["error"]["type"] == "cancelled"
        # A worker killed mid-stream: the other takes the request over (XAUTOCLAIM, claim script, XRANGE).
        with http.stream("POST", url, json=chat_body("failover", max_tokens=40, model=MODEL)) as response:
            taken_id = response.headers["x-request-id"]
            events = iter_sse(response)
            next(item for item in events if not isinstance(item, str))
            holder = stack.meta(taken_id)["worker"]
            next(w for w in stack.procs if w.argv[0] == "worker" and holder in w.argv).kill()
            rest = [item for item in events if not isinstance(item, str)]
        assert rest[-1].data == "[DONE]" and "error" not in rest[-2].data
        assert stack.meta(taken_id)["attempt"] == "2"


def test_gateway_and_worker_run_with_only_the_grants_of_the_ops_acl_file(secured: Secured, tmp_path: Path) -> None:
    stack = Cluster(secured.admin_url, tmp_path)
    try:
        stack.redis.execute_command("ACL LOG", "RESET", **all_nodes(stack))
        gateway = run_roles(
            stack,
            # The per-key limits on, so their scripts' commands are exercised under the ACL too.
            {
                "TOKENSPOOL_REDIS_URL": secured.gateway_url(),
                "TOKENSPOOL_KEY_REQUESTS_PER_MINUTE": "1000",
                "TOKENSPOOL_KEY_MAX_STREAMS": "100",
            },
            {"TOKENSPOOL_REDIS_URL": secured.worker_url()},
        )
        exercise(stack, gateway)
        assert denied_commands(stack.redis) == [], "a role needed a command its ACL user lacks"
        for proc in stack.procs:
            assert "NOPERM" not in proc.log() and "NOAUTH" not in proc.log(), proc.log()
    finally:
        stack.close()


def all_nodes(stack: Cluster) -> dict[str, Any]:
    return {"target_nodes": redis.RedisCluster.ALL_NODES} if isinstance(stack.redis, redis.RedisCluster) else {}


def test_each_role_is_refused_what_it_does_not_need(secured: Secured) -> None:
    gateway: Any = connect_sync(RedisTarget(secured.gateway_url()))
    worker: Any = connect_sync(RedisTarget(secured.worker_url()))
    try:
        queue = keys.queue_key(MODEL)
        for refused in (
            lambda: gateway.xreadgroup(keys.WORKER_GROUP, "intruder", {queue: ">"}, count=1),
            lambda: gateway.xack(queue, keys.WORKER_GROUP, "1-0"),
            lambda: gateway.flushall(),
            lambda: gateway.set("not-tokenspool", "x"),
            lambda: worker.client_unblock(1),
            lambda: worker.delete(keys.workers_key()),
            lambda: worker.config_get("*"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=secured.port).ping()  # the default user is off
    finally:
        gateway.close()
        worker.close()


def test_a_wrong_password_stops_the_gateway_at_start_without_printing_the_password(secured: Secured) -> None:
    bad_password = "wrong-" + secrets.token_hex(4)
    result = subprocess.run(
        [sys.executable, "-m", "tokenspool", "gateway"],
        env=clean_env(secured.url("tokenspool-gateway", bad_password)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "cannot reach Redis at redis" in result.stderr and "://tokenspool-gateway:***@127.0.0.1" in result.stderr
    assert "invalid username-password pair" in result.stderr, result.stderr
    assert bad_password not in result.stderr


TLS_ON_ONE_SERVER = (
    "TLS is terminated by stunnel in front of one server; a cluster's redirects name its nodes' own ports, "
    "which stunnel does not front"
)


@pytest.mark.single_server(reason=TLS_ON_ONE_SERVER)
def test_streams_over_tls_with_acl_users(secured: Secured, certificates: Certificates, tmp_path: Path) -> None:
    with TLSProxy(secured.port, certificates, tmp_path) as proxy:
        ca = {"TOKENSPOOL_REDIS_TLS_CA_FILE": str(certificates.ca_file)}
        stack = Cluster(secured.admin_url, tmp_path)
        try:
            gateway = run_roles(
                stack,
                {"TOKENSPOOL_REDIS_URL": secured.gateway_url(scheme="rediss", port=proxy.port), **ca},
                {"TOKENSPOOL_REDIS_URL": secured.worker_url(scheme="rediss", port=proxy.port), **ca},
            )
            exercise(stack, gateway)
            # The processes know only the proxy's port and a rediss:// URL: every connection of theirs
            # was TLS, verified with the CA, and authenticated as its role's user.
            users = {c["user"] for c in stack.redis.client_list()}
            assert {"tokenspool-gateway", "tokenspool-worker"} <= users, users
        finally:
            stack.close()


@pytest.mark.single_server(reason=TLS_ON_ONE_SERVER)
def test_tls_without_the_ca_is_refused_with_a_clear_message(
    secured: Secured, certificates: Certificates, tmp_path: Path
) -> None:
    with TLSProxy(secured.port, certificates, tmp_path) as proxy:
        result = subprocess.run(
            [sys.executable, "-m", "tokenspool", "gateway"],
            env=clean_env(secured.gateway_url(scheme="rediss", port=proxy.port)),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert "certificate verify failed" in result.stderr, result.stderr
    mismatched = subprocess.run(
        [sys.executable, "-m", "tokenspool", "gateway"],
        env={**clean_env(secured.gateway_url()), "TOKENSPOOL_REDIS_TLS_CA_FILE": str(certificates.ca_file)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert mismatched.returncode == 2 and "not rediss://" in mismatched.stderr, mismatched.stderr
