"""A worker's leases on its requests' queue entries: renewing them, giving them up (migration), and taking
over the entries of workers that stopped renewing theirs, or dead-lettering a request that keeps killing
its workers.

A pending entry of the consumer group is the lease: every heartbeat the holder resets its idle time;
another worker takes an entry idle longer than ``lease_timeout_s`` and continues the request from its
stored tokens, fencing the old holder with a new attempt number.

An entry's idle time proves its holder stopped only if the holder could have renewed it all that time.
Across a Redis outage nobody could. A restarted server restores its pending entries with the idle time
they had plus the time it was down, so the takeover script claims nothing until the server has been up
for a lease timeout (``shared/lua/claim_abandoned.lua``). A server that stayed up while workers could not
reach it counts on too, so a worker whose own lease commands failed takes nothing over until a lease
timeout after Redis answered it again. Either way, by then every live holder, which renews every
heartbeat (shorter than a lease), has renewed its entries, and only the dead holders' entries look idle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from tokenspool.shared.logs import about
from tokenspool.shared.queue import ModelQueue, QueueEntry
from tokenspool.shared.redis_client import UNREACHABLE
from tokenspool.shared.store import RequestStore
from tokenspool.worker.metrics import WorkerMetrics
from tokenspool.worker.runner import RequestRunner
from tokenspool.worker.running import RunningRequests
from tokenspool.worker.settings import WorkerSettings

log = logging.getLogger("tokenspool.worker")

T = TypeVar("T")


@dataclass(eq=False)
class Leases:
    settings: WorkerSettings
    worker_id: str
    store: RequestStore
    queue: ModelQueue
    running: RunningRequests
    runner: RequestRunner
    metrics: WorkerMetrics
    _no_takeover_until: float = field(default=float("-inf"))
    """After a migration, this worker takes nothing over for a while (it would take back what it gave); after
    a Redis outage, neither (the leases of live workers look expired until they renewed them)."""
    _outage: bool = False
    """A lease command failed to reach Redis since the last one that did."""

    async def _reaching(self, command: Awaitable[T]) -> T:
        """Await a lease command, noting whether Redis could be reached: the first answer after a failure
        holds takeovers off for a lease timeout."""
        try:
            result = await command
        except UNREACHABLE:
            self._outage = True
            raise
        if self._outage:
            self._outage = False
            self._no_takeover_until = max(self._no_takeover_until, time.monotonic() + self.settings.lease_timeout_s)
            log.info(
                "Redis answering again: no takeover for %gs, while live workers renew their leases",
                self.settings.lease_timeout_s,
            )
        return result

    async def renew(self) -> None:
        """Renew the leases of running requests; a request whose lease another worker took is lost."""
        held = {r.entry_id: r for r in self.running if r.writable}
        renewed = await self._reaching(self.queue.renew_leases(list(held)))
        for entry_id in set(held) - renewed:
            entry = held[entry_id].log
            if entry is not None and not entry.done.is_set():
                entry.mark_lost("lease lost to another worker")

    async def release(self, request_ids: list[str]) -> int:
        """Hand running requests to other workers now (drain --migrate, rebalance): stop generating them
        and release their leases; another worker continues each from its emitted tokens."""
        entries = []
        for request_id in request_ids:
            held = self.running.get(request_id)
            if held is None or held.log is None or held.log.done.is_set() or held.log.lost:
                continue
            held.log.mark_lost("migrated to another worker")
            entries.append(held.entry_id)
        idle_ms = int(self.settings.lease_timeout_s * 1000) * 10
        await self.queue.release(entries, idle_ms)
        self._no_takeover_until = time.monotonic() + 3 * self.settings.lease_timeout_s
        self.metrics.migrations.inc(len(entries))
        log.info("released %d running request(s) to other workers", len(entries))
        return len(entries)

    async def take_over_abandoned(self) -> None:
        """Take entries whose holders stopped renewing them, as many as there are free slots."""
        free = self.running.free()
        if free <= 0 or self.running.failure is not None or time.monotonic() < self._no_takeover_until:
            return
        if self._outage:
            await self._reaching(self.queue.ping())  # back? then hold off, rather than claim at once
            return
        lease_ms = int(self.settings.lease_timeout_s * 1000)
        ours = []
        for entry in await self._reaching(self.queue.claim_abandoned(lease_ms, free)):
            if self.running.holds_entry(entry.entry_id):
                ours.append(entry)
            elif entry.delivered > self.settings.max_attempts:
                self.runner.chores.spawn(self._dead_letter(entry), f"dead-lettering entry {entry.entry_id!r}")
            else:
                self.runner.start(entry, takeover=True)
        # Ours all along: a lease that only looked expired (this worker paused, or could not renew it), or a
        # request this worker just gave up, whose task has not ended yet. Not an attempt: the delivery the
        # claim counted is taken back (after the takeovers above, which a failure here must not hold up).
        for entry in ours:
            log.info("the lease of queue entry %s looked expired but is this worker's", entry.entry_id.decode())
            await self._reaching(self.queue.uncount_delivery(entry))

    async def _dead_letter(self, entry: QueueEntry) -> None:
        """A request whose workers kept dying: end it with an error and record it for operators."""
        request_id = entry.job.request_id if entry.job else "?"
        reason = f"gave up after {entry.delivered - 1} attempts: every worker that ran it stopped"
        if entry.job is not None:
            await self.store.fail_abandoned(request_id, self.worker_id, f"request failed: {reason}")
        await self.queue.dead_letter(entry.entry_id, request_id, reason)
        self.metrics.dead_letters.inc()
        log.error("request %s dead-lettered: %s", request_id, reason, extra=about(request_id))
