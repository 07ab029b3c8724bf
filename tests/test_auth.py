"""API keys and request ownership, against real gateways (HTTP, WebSocket, gRPC) and a real worker: a
request belongs to the key that created it; every route that names a request answers another key exactly
as it answers an unknown id (404); keys are hashed before they reach memory or Redis and never logged; a
gateway without keys serves openly only on loopback, and says so."""

from __future__ import annotations

import base64
import hashlib
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.support import EVENT_STREAM, Cluster, Gateway, Proc, chat_body, clean_env, content_of, read_stream, wait_for
from tokenspool.client import AuthenticationError, Client, NotFoundError
from tokenspool.gateway.proto import tokenspool_chat_pb2 as pb
from tokenspool.gateway.proto import tokenspool_chat_pb2_grpc as pb_grpc
from tokenspool.redis_server import free_port
from tokenspool.shared import keys

ALICE = "sk-alice-" + secrets.token_hex(16)
BOB = "sk-bob-" + secrets.token_hex(16)
MODEL = "tokenspool-sim"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class KeyedGateway:
    """A gateway with two keys (alice, bob), serving HTTP and gRPC."""

    def __init__(self, cluster: Cluster, **settings: Any) -> None:
        self.grpc_port = free_port()
        self.gateway: Gateway = cluster.gateway(
            api_keys=f"alice:{ALICE},bob:{BOB}", grpc_port=self.grpc_port, log_level="debug", **settings
        )
        self.url = self.gateway.url
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
        grpc.channel_ready_future(self.channel).result(timeout=30)  # the gRPC port itself, not only HTTP
        self.stub = pb_grpc.ChatServiceStub(self.channel)


@pytest.fixture(scope="module")
def keyed(cluster: Cluster) -> Iterator[KeyedGateway]:
    cluster.worker(sim_itl_ms=5, sim_ttft_ms=10)
    gateway = KeyedGateway(cluster)
    yield gateway
    gateway.channel.close()


def create(gateway: KeyedGateway, key: str, **extra: Any) -> str:
    """A finished request of ``key``'s; its id."""
    stream = read_stream(
        "POST", gateway.url + "/v1/chat/completions", json=chat_body(max_tokens=6, **extra), headers=bearer(key)
    )
    assert content_of(stream.events)
    return stream.headers["x-request-id"] if stream.headers else ""


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def ws(gateway: KeyedGateway, **kwargs: Any) -> ClientConnection:
    return connect(gateway.url.replace("http://", "ws://") + "/v1/ws", open_timeout=10, **kwargs)


def ws_ask(socket: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    socket.send(orjson.dumps(message).decode())
    answer: dict[str, Any] = orjson.loads(socket.recv(timeout=15))
    return answer


# -- authentication -----------------------------------------------------------------------------------------


API_ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/chat/completions/stream?prompt=hi"),
    ("GET", "/v1/models"),
    ("GET", "/v1/requests/chatcmpl-" + "0" * 32),
    ("GET", "/v1/requests/chatcmpl-" + "0" * 32 + "/events"),
    ("DELETE", "/v1/requests/chatcmpl-" + "0" * 32),
]


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("sk-not-a-configured-key-000"), {"Authorization": f"Basic {ALICE}"}, {"Authorization": "Bearer"}],
    ids=["no-header", "unknown-key", "not-bearer", "empty-bearer"],
)
def test_every_api_route_refuses_a_caller_without_a_valid_key_with_401(
    cluster: Cluster, keyed: KeyedGateway, headers: dict[str, str]
) -> None:
    queued_before = cluster.redis.xlen(keys.queue_key(MODEL))
    for method, path in API_ROUTES:
        body = chat_body() if path == "/v1/chat/completions" else {"model": MODEL, "prompt": "hi"}
        response = httpx.request(method, keyed.url + path, headers=headers, json=body, timeout=10)
        error = error_of(response, 401)
        assert error["code"] in ("missing_api_key", "invalid_api_key"), (method, path)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert cluster.redis.xlen(keys.queue_key(MODEL)) == queued_before
    for open_path in ("/healthz", "/readyz", "/metrics", "/"):
        assert httpx.get(keyed.url + open_path, timeout=10).status_code == 200, open_path


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_caller_without_a_key_learns_nothing_about_its_body_it_is_refused_before_the_body_is_read(
    keyed: KeyedGateway, path: str
) -> None:
    """The key is checked before the body is validated: a body that breaks the schema, or none, without a key
    is a 401, not the 400 that would tell an unauthenticated caller what the gateway accepts. (Bytes that are
    not JSON at all are refused as such first: FastAPI parses JSON before it solves dependencies.)"""
    for body in (b'{"model": 7, "messages": "none"}', b"", b'{"model": "m", "max_tokens": -1}'):
        response = httpx.post(keyed.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=10)
        assert error_of(response, 401)["code"] == "missing_api_key", body


def test_a_valid_key_streams_and_its_request_records_the_keys_hash_not_the_key(
    cluster: Cluster, keyed: KeyedGateway
) -> None:
    request_id = create(keyed, ALICE)
    owner = cluster.meta(request_id)["owner"]
    assert owner == hashlib.sha256(ALICE.encode()).hexdigest()[:32]
    for key in cluster.redis.scan_iter(f"{keys.PREFIX}:*"):
        dumped = cluster.redis.dump(key) or b""
        assert ALICE.encode() not in dumped and ALICE.encode() not in key


def test_request_ids_carry_128_random_bits() -> None:
    ids = {keys.new_request_id("chat") for _ in range(2000)}
    assert len(ids) == 2000
    for request_id in ids:
        random_part = request_id.removeprefix("chatcmpl-")
        assert len(random_part) == 32 and int(random_part, 16) >= 0 and keys.is_request_id(request_id)
    # every one of the 128 bits varies
    bits = [int(i.removeprefix("chatcmpl-"), 16) for i in ids]
    assert all(any(b >> n & 1 for b in bits) and not all(b >> n & 1 for b in bits) for n in range(128))


# -- ownership: another key's request is an unknown request -----------------------------------------------


def test_another_keys_request_is_404_on_every_http_route_exactly_like_an_unknown_id(
    cluster: Cluster, keyed: KeyedGateway
) -> None:
    mine = create(keyed, ALICE)
    unknown = keys.new_request_id("chat")
    last = f"{mine}:2"

    def answers(request_id: str, key: str) -> list[tuple[int, Any]]:
        out = []
        for method, path, headers in [
            ("GET", f"/v1/requests/{request_id}", {}),
            ("GET", f"/v1/requests/{request_id}/events", {}),
            ("GET", f"/v1/requests/{request_id}/events", {"Last-Event-ID": f"{request_id}:2"}),
            ("GET", f"/v1/requests/{request_id}/events?last_event_id={request_id}:999", {}),
            ("GET", f"/v1/chat/completions/stream?last_event_id={request_id}:1", {}),
            ("DELETE", f"/v1/requests/{request_id}", {}),
        ]:
            response = httpx.request(method, keyed.url + path, headers={**headers, **bearer(key)}, timeout=10)
            body = response.json() if response.headers.get("content-type") == "application/json" else None
            if body is not None:
                body["error"]["message"] = body["error"]["message"].replace(request_id, "<id>")
            out.append((response.status_code, body))
        return out

    as_bob = answers(mine, BOB)
    assert [status for status, _ in as_bob] == [404] * 6
    assert as_bob == answers(unknown, BOB) == answers(unknown, ALICE)
    # nothing bob did touched alice's request: she still reads it whole, and it was not cancelled
    assert cluster.meta(mine)["state"] == "done"
    assert httpx.get(f"{keyed.url}/v1/requests/{mine}", headers=bearer(ALICE)).json()["state"] == "done"
    replay = read_stream(
        "GET", f"{keyed.url}/v1/requests/{mine}/events", headers={**bearer(ALICE), "Last-Event-ID": last}
    )
    assert replay.events and replay.events[-1].data == "[DONE]"


def test_another_key_cannot_cancel_a_running_request_but_its_owner_can(cluster: Cluster, keyed: KeyedGateway) -> None:
    body = chat_body(max_tokens=4000, stream=False, background=True, ignore_eos=True)  # runs until cancelled
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            keyed.url + "/v1/chat/completions",
            json={**body, "stream": True},
            headers={**bearer(ALICE), **EVENT_STREAM},
        ) as response,
    ):
        request_id = response.headers["x-request-id"]
    wait_for(lambda: cluster.meta(request_id).get("state") == "running", 10, "the request to run")
    assert httpx.delete(f"{keyed.url}/v1/requests/{request_id}", headers=bearer(BOB)).status_code == 404
    assert cluster.meta(request_id).get("cancel") != "1" and cluster.meta(request_id)["state"] == "running"
    assert httpx.delete(f"{keyed.url}/v1/requests/{request_id}", headers=bearer(ALICE)).status_code == 202
    wait_for(lambda: cluster.meta(request_id).get("state") == "cancelled", 10, "the owner's cancel")


def test_idempotency_keys_of_two_api_keys_never_meet(keyed: KeyedGateway) -> None:
    headers = {"Idempotency-Key": "same-" + secrets.token_hex(4)}
    body = chat_body(max_tokens=3, stream=False)
    url = keyed.url + "/v1/chat/completions"
    alice_1 = httpx.post(url, json=body, headers={**headers, **bearer(ALICE)}, timeout=30)
    alice_2 = httpx.post(url, json=body, headers={**headers, **bearer(ALICE)}, timeout=30)
    bob = httpx.post(url, json=body, headers={**headers, **bearer(BOB)}, timeout=30)
    assert alice_1.headers["x-request-id"] == alice_2.headers["x-request-id"] != bob.headers["x-request-id"]


def test_websocket_needs_a_key_takes_it_by_header_or_subprotocol_and_hides_other_keys_requests(
    keyed: KeyedGateway,
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        ws(keyed).close()
    assert refused.value.response.status_code == 401
    assert orjson.loads(refused.value.response.body or b"{}")["error"]["code"] == "missing_api_key"

    alices = create(keyed, ALICE)
    encoded = base64.urlsafe_b64encode(ALICE.encode()).decode().rstrip("=")
    with ws(keyed, subprotocols=["tokenspool.v1", f"tokenspool.bearer.{encoded}"]) as socket:  # type: ignore[list-item]
        assert socket.subprotocol == "tokenspool.v1"  # the key is never echoed back
        assert ws_ask(socket, {"resume": alices, "last_event_id": None, "id": 1})["type"] == "resumed"
    with ws(keyed, additional_headers=bearer(BOB)) as socket:
        for message in ({"resume": alices, "last_event_id": f"{alices}:1"}, {"cancel": alices}):
            answer = ws_ask(socket, message)
            assert answer["type"] == "error" and answer["status"] == 404
            assert answer["error"]["code"] == "request_not_found"
        accepted = ws_ask(socket, {"prompt": "hi", "model": MODEL, "max_tokens": 3})
        assert accepted["type"] == "accepted"
    bobs = accepted["request_id"]
    wait_for(lambda: httpx.get(f"{keyed.url}/v1/requests/{bobs}", headers=bearer(BOB)).status_code == 200, 10, "bob's")
    assert httpx.get(f"{keyed.url}/v1/requests/{bobs}", headers=bearer(ALICE)).status_code == 404


def test_grpc_needs_a_key_in_metadata_and_hides_other_keys_requests(keyed: KeyedGateway) -> None:
    request = pb.ChatRequest(model=MODEL, messages=[pb.ChatMessage(role="user", content="hi")], max_tokens=3)
    with pytest.raises(grpc.RpcError) as refused:
        list(keyed.stub.StreamChat(request, timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as wrong:
        list(keyed.stub.StreamChat(request, timeout=10, metadata=(("authorization", "Bearer sk-wrong-key-000000"),)))
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]

    alice_md = (("authorization", f"Bearer {ALICE}"),)
    bob_md = (("authorization", f"Bearer {BOB}"),)
    responses = list(keyed.stub.StreamChat(request, timeout=15, metadata=alice_md))
    alices = responses[-1].request_id
    assert responses[-1].kind == pb.ChatResponse.END
    resume = pb.ChatRequest(resume=pb.Resume(request_id=alices, last_event_id=f"{alices}:1"))
    assert list(keyed.stub.StreamChat(resume, timeout=15, metadata=alice_md))[-1].kind == pb.ChatResponse.END
    for call in (
        lambda: list(keyed.stub.StreamChat(resume, timeout=10, metadata=bob_md)),
        lambda: keyed.stub.Cancel(pb.CancelRequest(request_id=alices), timeout=10, metadata=bob_md),
    ):
        with pytest.raises(grpc.RpcError) as hidden:
            call()
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    replies = list(keyed.stub.BiStreamChat(iter([resume]), timeout=10, metadata=bob_md))
    assert replies[-1].kind == pb.ChatResponse.ERROR and replies[-1].error.code == "request_not_found"


# -- keys never logged -------------------------------------------------------------------------------------


def test_keys_never_appear_in_gateway_logs_even_at_debug_level(keyed: KeyedGateway) -> None:
    create(keyed, ALICE)
    httpx.get(keyed.url + "/v1/models", headers=bearer("sk-typo-" + ALICE[8:]))
    text = keyed.gateway.proc.log()
    assert "for key alice" in text  # the key's name identifies it in the log
    encoded = base64.urlsafe_b64encode(ALICE.encode()).decode().rstrip("=")
    assert "[redacted]" in text  # the WebSocket server's debug lines carried the headers; they were caught
    for secret in (ALICE, BOB, ALICE[8:], encoded, hashlib.sha256(ALICE.encode()).hexdigest()):
        assert secret not in text


# -- starting without keys -----------------------------------------------------------------------------------


def run_gateway_briefly(args: list[str], redis_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenspool", "gateway", *args],
        env=clean_env(redis_url),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_gateway_without_keys_refuses_to_listen_beyond_loopback_unless_told_to(cluster: Cluster) -> None:
    refused = run_gateway_briefly(["--host", "0.0.0.0", "--port", "0"], cluster.redis_url)
    assert refused.returncode == 2
    assert "no API key is configured" in refused.stderr and "TOKENSPOOL_ALLOW_OPEN" in refused.stderr
    open_gateway = cluster.gateway(host="0.0.0.0", allow_open="true")
    wait_for(lambda: "WITHOUT authentication" in open_gateway.proc.log(), 10, "the open-gateway warning")
    assert httpx.get(open_gateway.url + "/v1/models").status_code == 200


def test_a_loopback_gateway_without_keys_serves_openly_and_says_so(cluster: Cluster) -> None:
    gateway = cluster.gateway()
    wait_for(lambda: "serves without authentication" in gateway.proc.log(), 10, "the warning")
    assert httpx.get(gateway.url + "/v1/models", headers=bearer("anything-at-all-here")).status_code == 200


def test_a_key_file_with_names_comments_and_hashes_is_read_and_an_empty_one_stops_the_gateway(
    cluster: Cluster, tmp_path: Path
) -> None:
    hashed_key = "sk-hashed-" + secrets.token_hex(12)
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# team keys\n\ncarol:{ALICE}x\n  sha256:{hashlib.sha256(hashed_key.encode()).hexdigest()}\n")
    gateway = cluster.gateway(api_keys_file=str(key_file))
    assert httpx.get(gateway.url + "/v1/models", headers=bearer(ALICE + "x")).status_code == 200
    assert httpx.get(gateway.url + "/v1/models", headers=bearer(hashed_key)).status_code == 200
    assert httpx.get(gateway.url + "/v1/models", headers=bearer(ALICE)).status_code == 401

    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody yet\n")
    for bad in (str(empty), str(tmp_path / "missing.txt")):
        result = run_gateway_briefly(["--api-keys-file", bad, "--port", "0"], cluster.redis_url)
        assert result.returncode == 2 and "TOKENSPOOL_API_KEYS_FILE" in result.stderr
    short = run_gateway_briefly(["--api-keys", "tiny-secret"], cluster.redis_url)
    assert short.returncode == 2 and "at least 16" in short.stderr and "tiny-secret" not in short.stderr


def test_the_python_client_sends_its_api_key_and_sees_other_keys_requests_as_unknown(keyed: KeyedGateway) -> None:
    with Client(keyed.url, api_key=ALICE) as alice, Client(keyed.url, api_key=BOB) as bob:
        with alice.stream_chat([{"role": "user", "content": "hi"}], model=MODEL, max_tokens=4) as stream:
            text = "".join(event.text for event in stream)
        assert text and stream.request_id
        assert alice.status(stream.request_id).state == "done"
        with pytest.raises(NotFoundError):
            bob.status(stream.request_id)
    with Client(keyed.url) as anonymous, pytest.raises(AuthenticationError) as refused:
        anonymous.status(stream.request_id)
    assert refused.value.status == 401 and refused.value.code == "missing_api_key"


def test_up_with_keys_starts_a_stack_that_requires_them_and_refuses_open_beyond_loopback(tmp_path: Path) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "tokenspool", "up", "--host", "0.0.0.0"],
        env=clean_env(None),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "no API key is configured" in refused.stderr
    port = free_port()
    up = Proc(["up", "--port", str(port)], tmp_path / "up.log", {**clean_env(None), "TOKENSPOOL_API_KEYS": ALICE})
    try:
        wait_for(lambda: "tokenspool is up at" in up.log() or not up.alive(), 60, "the stack to start")
        assert up.alive(), up.log()
        assert "Authorization: Bearer $YOUR_KEY" in up.log() and ALICE not in up.log()
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        assert httpx.post(url, json=chat_body(max_tokens=3)).status_code == 401
        stream = read_stream("POST", url, json=chat_body(max_tokens=3), headers=bearer(ALICE))
        assert stream.events[-1].data == "[DONE]"
    finally:
        up.stop()
