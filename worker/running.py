"""The requests a worker holds: each one's queue entry (its lease), task and write side, within the engine's
capacity; and whether the worker still takes new ones."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

from tokenspool.shared import wire
from tokenspool.worker.outbox import RequestLog


@dataclass(eq=False)
class RunningRequest:
    """A request this worker holds: its queue entry (the lease), its job, its task, and its write side
    (from the moment it is claimed)."""

    entry_id: bytes
    job: wire.Job
    task: asyncio.Task[None] | None = None
    log: RequestLog | None = None

    @property
    def writable(self) -> bool:
        """Claimed, and still this worker's to write."""
        return self.log is not None and not self.log.lost


class RunningRequests:
    """The held requests by id. Capacity is the engine's: the worker pulls at most as many requests as it
    has free slots, so a busy worker leaves new requests in the queue for an idle one."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: dict[str, RunningRequest] = {}
        self._changed = asyncio.Event()
        self.failure: BaseException | None = None
        """Why this worker takes no more requests (its engine died); None while it takes them."""

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[RunningRequest]:
        return iter(list(self._held.values()))

    def get(self, request_id: str) -> RunningRequest | None:
        return self._held.get(request_id)

    def ids(self) -> list[str]:
        return list(self._held)

    def writable(self) -> dict[str, RequestLog]:
        """The write sides of the requests this worker still holds, by request id."""
        return {rid: r.log for rid, r in self._held.items() if r.log is not None and not r.log.lost}

    def holds_entry(self, entry_id: bytes) -> bool:
        return any(r.entry_id == entry_id for r in self._held.values())

    def free(self) -> int:
        return self.capacity - len(self._held)

    def add(self, running: RunningRequest) -> None:
        self._held[running.job.request_id] = running

    def remove(self, request_id: str, task: asyncio.Task[None]) -> None:
        """Forget a request whose task ended (unless a later task holds it now); frees its slot."""
        running = self._held.get(request_id)
        if running is not None and running.task is task:
            del self._held[request_id]
        self._changed.set()

    def close(self, failure: BaseException) -> None:
        """Take no more requests: :meth:`room` raises ``failure`` from now on."""
        if self.failure is None:
            self.failure = failure
        self._changed.set()

    async def room(self) -> int:
        """The number of free slots, once there is one; raises :attr:`failure` once closed."""
        while True:
            if self.failure is not None:
                raise self.failure
            free = self.free()
            if free > 0:
                return free
            self._changed.clear()
            await self._changed.wait()
