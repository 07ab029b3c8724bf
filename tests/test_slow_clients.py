"""Clients that never finish sending: a request head sent a byte at a time (slowloris), a connection that
sends nothing, a body shorter than its Content-Length; and one that stops reading its stream. Each is closed
once its deadline passes, and every open socket counts against the gateway's connection limit while it
lasts."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from tests.support import Cluster, Gateway, chat_body, wait_for, wait_for_model
from tokenspool.gateway.limits import PROBE_SOCKETS

HEAD_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
PATIENCE_S = 20.0
"""How long a test waits for the gateway to act on a deadline of about a second (slow machines)."""


@pytest.fixture(scope="module")
def gateway(cluster: Cluster) -> Gateway:
    return cluster.gateway(header_timeout_s=HEAD_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S)


def open_socket(gateway: Gateway) -> socket.socket:
    address = urlsplit(gateway.url)
    sock = socket.create_connection((address.hostname, address.port), timeout=PATIENCE_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails the test if it does not)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the gateway kept the connection open for {PATIENCE_S}s") from None
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


@pytest.fixture
def sockets() -> Iterator[ExitStack]:
    with ExitStack() as opened:
        yield opened


def test_a_connection_that_sends_nothing_is_closed(gateway: Gateway, sockets: ExitStack) -> None:
    sock = sockets.enter_context(open_socket(gateway))
    started = time.monotonic()
    assert read_until_closed(sock) == b"", "nothing to answer: no request began"
    assert time.monotonic() - started >= HEAD_TIMEOUT_S * 0.9


def test_headers_sent_a_byte_at_a_time_are_cut_off_with_408(gateway: Gateway, sockets: ExitStack) -> None:
    """Twenty slowloris connections, each trickling an endless header a byte every 50 ms: every one is closed
    (with a 408) about a head timeout after it opened, however much it keeps sending."""
    socks = [sockets.enter_context(open_socket(gateway)) for _ in range(20)]
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    for sock in socks:
        sock.setblocking(False)
    answers: dict[int, bytes] = {}
    open_ = set(range(len(socks)))
    deadline = time.monotonic() + PATIENCE_S
    position = 0
    while open_ and time.monotonic() < deadline:
        for i in sorted(open_):
            try:
                socks[i].send(head[position : position + 1])
                chunk = socks[i].recv(4096)
            except BlockingIOError:
                continue  # nothing from the server yet: still open
            except (BrokenPipeError, ConnectionResetError):
                chunk = b""
            answers[i] = answers.get(i, b"") + chunk
            if not chunk:
                open_.discard(i)
        position += 1
        time.sleep(0.05)  # the attacker's pace, not a wait for the gateway
    assert not open_, f"{len(open_)} slow connections were still open after {PATIENCE_S}s"
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers.values()), answers


def test_a_body_shorter_than_its_content_length_is_answered_408(gateway: Gateway, sockets: ExitStack) -> None:
    sock = sockets.enter_context(open_socket(gateway))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + b'{"model": "tokenspool-sim", '
    )
    answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"code":"body_timeout"' in answer, answer


def test_sockets_that_have_not_sent_a_request_count_against_the_connection_limit(
    cluster: Cluster, sockets: ExitStack
) -> None:
    """A gateway with room for 2 connections (plus the room kept for probes): that many silent sockets fill
    it, and it answers 503 until they go."""
    gateway = cluster.gateway(max_connections=2, header_timeout_s=60)
    silent = [sockets.enter_context(open_socket(gateway)) for _ in range(2 + PROBE_SOCKETS)]

    def refused() -> bool:
        return httpx.get(gateway.url + "/healthz", timeout=PATIENCE_S).status_code == 503

    wait_for(refused, PATIENCE_S, "the gateway to refuse a connection beyond its limit")
    for sock in silent:
        sock.close()

    def served() -> bool:
        return httpx.get(gateway.url + "/healthz", timeout=PATIENCE_S).status_code == 200

    wait_for(served, PATIENCE_S, "the gateway to serve again once the silent sockets closed")


def test_a_stream_whose_client_stops_reading_is_closed_after_the_send_timeout(
    cluster: Cluster, sockets: ExitStack
) -> None:
    """A client that stops reading an SSE stream fills the socket's buffers; the gateway's next write then
    waits, and once one has waited ``send_timeout_s`` the stream is closed (and logged) rather than held."""
    gateway = cluster.gateway(send_timeout_s=0.5)
    cluster.worker(model="unread", sim_ttft_ms=0, sim_itl_ms=0)
    wait_for_model(gateway, "unread")
    address = urlsplit(gateway.url)
    sock = sockets.enter_context(socket.socket())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window stays small
    sock.settimeout(PATIENCE_S)
    sock.connect((address.hostname, address.port))
    # About 1.5 KB per event (20 alternatives per token): far more than the socket buffers hold.
    body = orjson.dumps(chat_body(max_tokens=20_000, model="unread", logprobs=True, top_logprobs=20, ignore_eos=True))
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert sock.recv(12).startswith(b"HTTP/1.1 200"), "the stream began"
    wait_for(
        lambda: "client did not accept a write within 0.5s" in gateway.proc.log(),
        timeout_s=PATIENCE_S,
        what="the gateway to drop the client that stopped reading",
    )
    received = read_until_closed(sock)
    assert b"data: [DONE]" not in received, "the stream was cut, not finished"
