"""Asyncio helpers shared by gateways and workers."""

from __future__ import annotations

import asyncio


def reraise_if_cancelling() -> None:
    """Call in a retry loop's ``except`` clause. A cancellation can arrive disguised as the error being
    retried (Python 3.11's ``asyncio.timeout`` may turn a cancel that races a socket timeout into
    ``TimeoutError``, which redis-py reports as its own error): if this task has been asked to stop,
    stop, instead of retrying forever with the cancellation swallowed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
