"""Asyncio helpers shared by gateways and workers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def reraise_if_cancelling() -> None:
    """Call in a retry loop's ``except`` clause. A cancellation can arrive disguised as the error being
    retried (Python 3.11's ``asyncio.timeout`` may turn a cancel that races a socket timeout into
    ``TimeoutError``, which redis-py reports as its own error): if this task has been asked to stop,
    stop, instead of retrying forever with the cancellation swallowed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class GroupCommit(Generic[T, R]):
    """Calls that arrive while a round trip is in flight wait and go together in the next one (the outbox's
    group commit, for calls of one kind: claims, acknowledgements). At low load a call is sent at once, on
    the loop's next turn; under load N concurrent calls cost one round trip instead of N, each a
    connection's turn on the bounded command pool.

    ``send`` gets the items in call order and answers one result per item, in order, an exception for an
    item that failed; an exception it raises fails every call of that round trip. A caller that is
    cancelled stops waiting (its item may still be sent: everything sent this way must be safe to send
    once more than asked). At most one round trip is in flight, so the waiting calls are bounded by the
    callers (a worker's running requests)."""

    def __init__(self, send: Callable[[list[T]], Awaitable[list[R | Exception]]], name: str) -> None:
        self._send = send
        self._name = name
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_waiting(), name=self._name)
        return await future

    async def _send_waiting(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    results = await self._send([item for item, _ in batch])
                except Exception as exc:  # every caller of this round trip gets it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
        except BaseException:
            for _, future in (*batch, *self._waiting):
                future.cancel()
            self._waiting = []
            raise
        finally:
            self._sender = None
