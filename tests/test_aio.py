"""Cancellation helpers (shared/aio.py), in process."""

from __future__ import annotations

import asyncio

import pytest

from tokenspool.shared.aio import reraise_if_cancelling


def test_a_retry_loop_stops_when_cancelled_even_if_the_cancel_arrives_as_a_timeout() -> None:
    retries = 0

    async def retry_loop() -> None:
        nonlocal retries
        while True:
            try:
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    raise TimeoutError from None  # what a cancel racing a socket timeout can become
            except TimeoutError:
                reraise_if_cancelling()
                retries += 1

    async def scenario() -> None:
        task = asyncio.create_task(retry_loop())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)

    asyncio.run(scenario())
    assert retries == 0, "the loop never saw a real timeout"
