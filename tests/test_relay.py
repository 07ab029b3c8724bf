"""The relay (gateway/relay.py), in process: a subscription's bounded buffer; which streams its read names."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from tokenspool.gateway.relay import Relay, Subscription
from tokenspool.redis_server import EmbeddedRedis
from tokenspool.shared import keys, wire
from tokenspool.shared.redis_client import AsyncRedis, NodeConnections, RedisTarget, connect


def test_a_full_subscription_buffer_overflows_instead_of_blocking_the_reader() -> None:
    async def scenario() -> None:
        sub = Subscription(b"key", 0, cursor=3, limit=2)
        assert sub.push(3, b"old") and sub.items == [], "events at or below the cursor are dropped"
        assert sub.push(4, b"a") and sub.push(5, b"b")
        assert not sub.push(6, b"c"), "a third event overflows a 2-event buffer"
        assert sub.overflowed and sub.items == [] and sub.wake.is_set()

    asyncio.run(scenario())


def test_a_stream_whose_end_was_delivered_leaves_the_read_and_the_next_subscription_needs_no_unblock(
    tmp_path: Path,
) -> None:
    """After the reader delivers a stream's last event it stops naming that stream, even while its connection
    is still subscribed: with nothing else live it waits without a read, and the next subscription starts a
    read of its own instead of unblocking one (counted by the server: one XREAD per stream, no CLIENT
    UNBLOCK)."""

    async def scenario(url: str) -> None:
        async with running_relay(url) as (client, relay):
            await client.config_resetstat()
            first, second = keys.new_request_id("chat"), keys.new_request_id("chat")
            ended = relay.subscribe(first, 0)
            await append(client, first, wire.Event("delta", "a"), wire.Event("end", finish_reason="stop"))
            await buffered(ended, 2)
            live = relay.subscribe(second, 0)  # the first stays subscribed, as a connection still sending
            await append(client, second, wire.Event("delta", "b"))
            await buffered(live, 1)
            stats = await client.info("commandstats")
            assert stats["cmdstat_xread"]["calls"] == 2, stats["cmdstat_xread"]
            assert "cmdstat_client|unblock" not in stats, stats["cmdstat_client|unblock"]
            relay.unsubscribe(ended)
            relay.unsubscribe(live)

    with EmbeddedRedis(data_dir=tmp_path) as server:
        asyncio.run(scenario(server.url))


def test_a_read_answers_the_newest_subscription_first_so_a_first_token_waits_behind_no_running_stream(
    tmp_path: Path,
) -> None:
    """Redis answers an XREAD's streams in the order it names them, and the reader delivers (and wakes the
    connections) in that order: newest first, so a new request's first token is written before the next
    tokens of the streams already running in the same engine step."""

    async def scenario(url: str) -> None:
        async with running_relay(url) as (client, relay):
            running, new = keys.new_request_id("chat"), keys.new_request_id("chat")
            await append(client, running, wire.Event("delta", "next token"))
            await append(client, new, wire.Event("delta", "first token"))
            woken: list[str] = []

            async def connection(name: str, sub: Subscription) -> None:
                await sub.wake.wait()
                woken.append(name)

            # Subscribed in one turn of the loop: one read names both, and both have an event waiting. The
            # connections wait before the read's answer can arrive (it takes a round trip).
            older, newer = relay.subscribe(running, 0), relay.subscribe(new, 0)
            async with asyncio.timeout(10):
                await asyncio.gather(connection("running", older), connection("new", newer))
            assert woken == ["new", "running"]
            relay.unsubscribe(older)
            relay.unsubscribe(newer)

    with EmbeddedRedis(data_dir=tmp_path) as server:
        asyncio.run(scenario(server.url))


@contextlib.asynccontextmanager
async def running_relay(url: str) -> AsyncIterator[tuple[AsyncRedis, Relay]]:
    """A started relay on one server and a client to write its streams with; both closed afterwards."""
    target = RedisTarget(url)
    client = connect(target, name="test", max_connections=2)
    nodes = NodeConnections(target, client, name="test-relay", socket_timeout_s=10)
    relay = Relay(nodes, block_ms=5000, count=256, buffer_events=100)
    relay.start()
    try:
        yield client, relay
    finally:
        await relay.close()
        await client.aclose()


async def append(client: AsyncRedis, request_id: str, *events: wire.Event) -> None:
    """Add events to a request's stream with the ids the worker's append script gives them (1, 2, ...)."""
    stream = keys.RequestKeys.of(request_id).events
    seq = await client.xlen(stream)
    for event in events:
        seq += 1
        await client.xadd(stream, {"d": wire.encode(event)}, id=keys.stream_entry_id(seq))


async def buffered(sub: Subscription, count: int, timeout_s: float = 10.0) -> None:
    """Wait until the reader has buffered ``count`` events for ``sub``."""
    async with asyncio.timeout(timeout_s):
        while len(sub.items) < count:
            sub.wake.clear()
            await sub.wake.wait()
