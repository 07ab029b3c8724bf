"""A relay subscription's bounded buffer (gateway/relay.py), in process."""

from __future__ import annotations

import asyncio

from tokenspool.gateway.relay import Subscription


def test_a_full_subscription_buffer_overflows_instead_of_blocking_the_reader() -> None:
    async def scenario() -> None:
        sub = Subscription(b"key", 0, cursor=3, limit=2)
        assert sub.push(3, b"old") and sub.items == [], "events at or below the cursor are dropped"
        assert sub.push(4, b"a") and sub.push(5, b"b")
        assert not sub.push(6, b"c"), "a third event overflows a 2-event buffer"
        assert sub.overflowed and sub.items == [] and sub.wake.is_set()

    asyncio.run(scenario())
