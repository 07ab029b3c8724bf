"""A model's request queue and the operations a worker runs on it, through the workers' consumer group.

The queue is a Redis stream (``keys.queue_key``) read through one consumer group (``keys.WORKER_GROUP``):
an entry a worker has read stays *pending* for that worker until acknowledged, and that pending entry is
the worker's lease on the request. This module owns every queue command (group creation, ``XREADGROUP``,
lease renewal, ``XAUTOCLAIM`` takeovers, releases, acknowledgement, dead letters) and decodes the entries
into jobs, so a worker deals in :class:`QueueEntry` values, never in raw stream fields. Gateways enqueue
through :meth:`tokenspool.shared.store.RequestStore.create` (the request record and its entry together).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.exceptions

from tokenspool.shared import keys, lua, wire
from tokenspool.shared.aio import GroupCommit
from tokenspool.shared.redis_client import AsyncRedis

log = logging.getLogger("tokenspool.queue")

DEAD_LETTER_MAXLEN = 10_000


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One entry of a model's queue, decoded: the lease's id and the job it names."""

    entry_id: bytes
    job: wire.Job | None
    """None when the entry cannot be run (deleted meanwhile, or not a job this release reads)."""
    problem: str = ""
    """Why ``job`` is None."""
    delivered: int = 1
    """How many times the group has handed the entry out (a takeover counts one more)."""

    @classmethod
    def decode(cls, entry_id: bytes, fields: dict[bytes, bytes] | None, delivered: int = 1) -> QueueEntry:
        try:
            if not fields:
                raise wire.WireError("the entry was deleted")
            return cls(entry_id, wire.decode(fields[b"d"], wire.Job), delivered=delivered)
        except (KeyError, wire.WireError) as exc:
            return cls(entry_id, None, str(exc) or "no job field", delivered)


def is_missing_group(exc: Exception) -> bool:
    """The queue or its consumer group vanished (Redis lost its data, or someone deleted the key)."""
    return "NOGROUP" in str(exc)


async def waiting(client: AsyncRedis, model: str) -> int:
    """Requests of ``model`` not yet taken by any worker (queue length minus pending entries)."""
    queue = keys.queue_key(model)
    pipe: Any = client.pipeline(transaction=False)
    pipe.xlen(queue)
    pipe.xpending(queue, keys.WORKER_GROUP)
    length, pending = await pipe.execute(raise_on_error=False)
    if isinstance(length, Exception):
        raise length
    taken = int(pending["pending"]) if isinstance(pending, dict) else 0  # no group yet: nothing taken
    return max(0, int(length) - taken)


def pairs_to_dict(fields: list[bytes] | None) -> dict[bytes, bytes] | None:
    """A stream entry's fields as a script returns them (a flat list, or nil for a deleted entry)."""
    if not fields:
        return None
    return dict(zip(fields[::2], fields[1::2], strict=True))


class ModelQueue:
    """One model's queue as seen by one consumer (a worker).

    ``pull_client`` carries the blocking reads (its socket timeout must exceed the block time); everything
    else goes through ``client``."""

    def __init__(self, client: AsyncRedis, pull_client: AsyncRedis, model: str, consumer: str) -> None:
        self.model = model
        self.consumer = consumer
        self.key = keys.queue_key(model)
        self._r: Any = client
        self._pull: Any = pull_client
        self._renew = lua.register(client, "renew_leases")
        self._claim_abandoned = lua.register(client, "claim_abandoned")
        self._finish = GroupCommit(self._finish_all, f"acknowledging entries of {model}")

    @property
    def scripts(self) -> tuple[Any, ...]:
        """The scripts this queue runs (to load with :func:`tokenspool.shared.lua.load`)."""
        return (self._renew, self._claim_abandoned)

    async def ensure_group(self) -> None:
        """Create the queue and its consumer group unless they exist."""
        try:
            await self._r.xgroup_create(self.key, keys.WORKER_GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _recreate_if_missing(self, exc: redis.exceptions.ResponseError) -> None:
        """Re-raise ``exc`` unless the group vanished; then recreate it (the caller's leases are gone)."""
        if not is_missing_group(exc):
            raise exc
        log.warning("the queue of %r or its consumer group vanished (Redis lost its data?); recreating it", self.model)
        await self.ensure_group()

    async def read_new(self, count: int, block_ms: int) -> list[QueueEntry]:
        """Up to ``count`` entries no consumer has read yet, now leased to this one; waits up to
        ``block_ms`` for the first. Empty when none came (or the group had to be recreated)."""
        try:
            reply = await self._pull.xreadgroup(
                keys.WORKER_GROUP, self.consumer, {self.key: ">"}, count=count, block=block_ms
            )
        except redis.exceptions.ResponseError as exc:
            await self._recreate_if_missing(exc)
            return []
        return [QueueEntry.decode(entry_id, fields) for _stream, entries in reply or [] for entry_id, fields in entries]

    async def ping(self) -> None:
        """One round trip to the server: is it reachable?"""
        await self._r.ping()

    async def renew_leases(self, entry_ids: list[bytes]) -> set[bytes]:
        """Reset the idle time of this consumer's pending entries; the ids it still holds (one script)."""
        if not entry_ids:
            return set()
        try:
            renewed = await self._renew(keys=[self.key], args=[keys.WORKER_GROUP, self.consumer, *entry_ids])
        except redis.exceptions.ResponseError as exc:
            await self._recreate_if_missing(exc)
            return set()
        return {bytes(entry) for entry in renewed}

    async def claim_abandoned(self, min_idle_ms: int, count: int) -> list[QueueEntry]:
        """Up to ``count`` entries whose holder stopped renewing them for ``min_idle_ms``, now leased to
        this consumer, each with the times it has been delivered (a takeover included). None while the
        server has been up for less than ``min_idle_ms`` (after a restart, the idle time of an entry
        includes the time the server was down: see ``claim_abandoned.lua``)."""
        claimed: list[tuple[bytes, dict[bytes, bytes] | None]] = []
        cursor: Any = "0-0"
        try:
            while len(claimed) < count:
                reply = await self._claim_abandoned(
                    keys=[self.key],
                    args=[keys.WORKER_GROUP, self.consumer, min_idle_ms, cursor, count - len(claimed)],
                )
                cursor, entries = reply[0], reply[1]
                claimed.extend((entry_id, pairs_to_dict(fields)) for entry_id, fields in entries)
                if cursor in (b"0-0", "0-0"):
                    break
        except redis.exceptions.ResponseError as exc:
            await self._recreate_if_missing(exc)
            return []
        out = []
        for entry_id, fields in claimed:
            info = await self._r.xpending_range(self.key, keys.WORKER_GROUP, min=entry_id, max=entry_id, count=1)
            delivered = int(info[0]["times_delivered"]) if info else 1
            out.append(QueueEntry.decode(entry_id, fields, delivered))
        return out

    async def uncount_delivery(self, entry: QueueEntry) -> None:
        """Take back the delivery a takeover scan counted on an entry this consumer held all along (its
        lease only looked expired): ``XAUTOCLAIM`` counts one per claim, and the count is what decides a
        dead letter (``times_delivered`` against the attempts allowed), so a scan that claims a worker's own
        entries must not use up its request's attempts. Like the claim, this leaves the entry idle 0."""
        await self._r.xclaim(
            self.key, keys.WORKER_GROUP, self.consumer, 0, [entry.entry_id], retrycount=entry.delivered - 1, justid=True
        )

    async def release(self, entry_ids: list[bytes], idle_ms: int) -> None:
        """Give up leases at once: mark the entries idle for ``idle_ms`` so another worker's next scan takes
        them (a migration); the attempt fencing stops this worker writing to them after that."""
        if not entry_ids:
            return
        pipe = self._r.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xclaim(self.key, keys.WORKER_GROUP, self.consumer, 0, [entry_id], idle=idle_ms, justid=True)
        await pipe.execute()

    async def finish(self, entry_id: bytes) -> None:
        """Acknowledge and delete an entry once its request has ended (a queue that vanished with its
        group, when Redis lost its data, has nothing left to acknowledge). The entries of requests that end
        together go in one ``XACK`` and one ``XDEL`` (:class:`GroupCommit`; both are safe to repeat)."""
        await self._finish(entry_id)

    async def _finish_all(self, entry_ids: list[bytes]) -> list[Exception | None]:
        pipe = self._r.pipeline(transaction=False)
        pipe.xack(self.key, keys.WORKER_GROUP, *entry_ids)
        pipe.xdel(self.key, *entry_ids)
        for result in await pipe.execute(raise_on_error=False):
            if isinstance(result, Exception) and not is_missing_group(result):
                raise result
        return [None] * len(entry_ids)

    async def dead_letter(self, entry_id: bytes, request_id: str, reason: str) -> None:
        """Give up on a request: record it for operators and take its entry off the queue."""
        await self._r.xadd(
            keys.dead_letter_key(self.model),
            {"request_id": request_id, "reason": reason, "at_ms": int(time.time() * 1000)},
            maxlen=DEAD_LETTER_MAXLEN,
            approximate=True,
        )
        await self.finish(entry_id)

    async def waiting(self) -> int:
        """Requests not yet taken by any worker."""
        return await waiting(self._r, self.model)
