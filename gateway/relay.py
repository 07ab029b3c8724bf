"""The multiplexed reader: one blocking XREAD for all live connections of this process (one per hash slot on
a Redis Cluster).

A gateway never holds a blocked Redis connection per client. On one server a single reader task with one
dedicated connection blocks on a single XREAD over the event streams of every subscription, each from the
last id seen (never ``$``, which can miss entries between two reads), and hands what arrives to the
subscriptions' buffers: a worker's flush of one engine step wakes it once. On a cluster each partition
(hash slot) has its own reader, since a multi-key XREAD must stay in one slot.

A buffer is bounded. The reader never waits for a client: when a subscription's buffer is full the
reader drops the buffer and detaches it, and the connection catches up on its own with range reads from
its last delivered event (everything is in Redis), then subscribes again. A slow client therefore costs
itself a few range reads and never stalls the reader or another client.

A stream leaves the XREAD as soon as the reader has delivered its last event (``end`` or ``error``): its
connections unsubscribe once they have sent it, but the read re-issued meanwhile need not name it, and a
reader left with no live stream waits without a read, so the next subscription needs no unblock.

A new subscription must not wait for the reader's current block to time out: the reader's connection
is unblocked with ``CLIENT UNBLOCK`` from a control connection to the same node, and the next XREAD
includes it.

On a Redis Cluster a partition is one hash slot, so its multi-key XREAD is legal and its reader connects to
the node that owns the slot (and sends ``CLIENT UNBLOCK`` there). When the slot moves (resharding,
failover) the node answers ``MOVED`` or stops answering; the reader re-reads the slot map, reconnects to
the new owner and goes on from its cursors, like after any reconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.exceptions
from redis.asyncio.connection import AbstractConnection

from tokenspool.shared import keys, wire
from tokenspool.shared.aio import reraise_if_cancelling
from tokenspool.shared.redis_client import Address, NodeConnections

log = logging.getLogger("tokenspool.gateway.relay")


class Subscription:
    """One connection's view of one request stream: a bounded buffer of (seq, payload) after ``cursor``."""

    __slots__ = ("cursor", "items", "key", "limit", "overflowed", "partition", "wake")

    def __init__(self, key: bytes, partition: int, cursor: int, limit: int) -> None:
        self.key = key
        self.partition = partition
        self.cursor = cursor
        self.limit = limit
        self.items: list[tuple[int, bytes]] = []
        self.overflowed = False
        self.wake = asyncio.Event()

    def push(self, seq: int, payload: bytes) -> bool:
        """Buffer one event; False when the buffer overflowed and the subscription must be detached."""
        if seq <= self.cursor:
            return True
        if len(self.items) >= self.limit:
            self.overflowed = True
            self.items.clear()
            self.wake.set()
            return False
        self.items.append((seq, payload))
        self.cursor = seq
        self.wake.set()
        return True

    def take(self) -> list[tuple[int, bytes]]:
        items, self.items = self.items, []
        self.wake.clear()
        return items


class PartitionReader:
    """The reader task of a group of partitions: all sixteen on one server (one XREAD wakes for every
    stream the gateway relays: one round trip per worker flush instead of one per partition), one on a
    cluster (a multi-key XREAD must stay in one hash slot)."""

    def __init__(self, partitions: tuple[int, ...], nodes: NodeConnections, block_ms: int, count: int) -> None:
        self.partitions = partitions
        self.label = str(partitions[0]) if len(partitions) == 1 else f"{partitions[0]}-{partitions[-1]}"
        self._nodes = nodes
        self._slot_key = keys.partition_slot_key(partitions[0])
        self._block_ms = block_ms
        self._count = count
        self._subs: dict[bytes, dict[Subscription, None]] = {}
        self._positions: dict[bytes, int] = {}
        self._changed = asyncio.Event()
        self._conn: AbstractConnection | None = None
        self._address: Address | None = None
        self._client_id: int | None = None
        self._blocked = False
        self._waker: asyncio.Task[None] | None = None
        self.reads = 0

    def add(self, sub: Subscription) -> None:
        self._subs.setdefault(sub.key, {})[sub] = None
        current = self._positions.get(sub.key)
        self._positions[sub.key] = sub.cursor if current is None else min(current, sub.cursor)
        self.wake()

    def wake(self) -> None:
        self._changed.set()
        if self._blocked and (self._waker is None or self._waker.done()):
            self._waker = asyncio.create_task(self._unblock())

    def remove(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key)
        if subs is None:
            return
        subs.pop(sub, None)
        if not subs:
            del self._subs[sub.key]
            self._positions.pop(sub.key, None)

    async def _unblock(self) -> None:
        """Wake the blocked XREAD so it picks up new subscriptions (retried until the reader is awake)."""
        while self._blocked and self._changed.is_set() and self._client_id is not None:
            client_id, address = self._client_id, self._address
            if address is None:
                return
            try:
                woke = await self._nodes.control(address).client_unblock(client_id)
            except (redis.exceptions.RedisError, OSError):
                return
            if woke:
                return
            await asyncio.sleep(0.001)  # the XREAD has not reached the server yet

    async def _connect(self) -> AbstractConnection:
        address = await self._nodes.address_for(self._slot_key)
        conn = await self._nodes.open(address)
        try:
            await conn.send_command("CLIENT", "ID")
            self._client_id = int(await conn.read_response())
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect()
            raise
        self._address = address
        return conn

    async def _disconnect(self) -> None:
        conn, self._conn, self._client_id, self._address = self._conn, None, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def run(self) -> None:
        backoff_s = 0.05
        try:
            while True:
                if not self._positions:  # no subscription, or only to streams whose end it has delivered
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                self._changed.clear()
                # Newest subscriptions first: Redis answers the streams in the order they are named, and the
                # reader delivers them in that order, so a stream waiting for its first event (a new
                # request's first token, a resume's first replayed event) is written to its client before the
                # running streams' next tokens of the same engine step. A running stream moves back one place
                # for each newer one, a few microseconds: its pace does not change.
                streams = list(reversed(self._positions.items()))
                try:
                    if self._conn is None:
                        self._conn = await self._connect()
                    args: list[Any] = ["XREAD", "COUNT", self._count, "BLOCK", self._block_ms, "STREAMS"]
                    args += [key for key, _ in streams]
                    args += [keys.stream_entry_id(pos) for _, pos in streams]
                    self._blocked = True
                    await self._conn.send_command(*args)
                    reply = await self._conn.read_response()
                    backoff_s = 0.05
                except (
                    redis.exceptions.ConnectionError,
                    redis.exceptions.TimeoutError,
                    redis.exceptions.AskError,  # MOVED too: the slot has a new owner
                    redis.exceptions.TryAgainError,
                    redis.exceptions.ClusterDownError,
                    OSError,
                ) as exc:
                    reraise_if_cancelling()
                    log.warning(
                        "partition %s reader: %s %s; reconnecting in %.2fs",
                        self.label,
                        type(exc).__name__,
                        exc,
                        backoff_s,
                    )
                    await self._disconnect()
                    await self._nodes.refresh()
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, 2.0)
                    continue
                finally:
                    self._blocked = False
                self.reads += 1
                if reply:
                    self._deliver(reply)
        finally:
            await self._disconnect()

    def _deliver(self, reply: Any) -> None:
        streams = reply.items() if isinstance(reply, dict) else reply  # RESP3 map or RESP2 array
        for key, entries in streams:
            subs = self._subs.get(key)
            if not subs or not entries:
                continue
            last = 0
            for entry_id, fields in entries:
                seq = keys.seq_of_entry_id(entry_id)
                payload = fields[1]
                last = seq
                for sub in list(subs):
                    if not sub.push(seq, payload):
                        self.remove(sub)
            if key in self._positions:
                if _ends_stream(payload):
                    # The stream has ended: nothing more can come, so the next XREAD leaves it out while its
                    # connections finish (a resume that subscribes again puts it back). Without this, the
                    # read re-issued right after delivering the end still named the stream, and the next
                    # new subscription had to unblock it.
                    del self._positions[key]
                else:
                    self._positions[key] = max(self._positions[key], last)


def _ends_stream(payload: bytes) -> bool:
    """Whether an event ends its stream; an undecodable one does not (its reader reports it, not the relay)."""
    try:
        return wire.is_terminal(payload)
    except wire.WireError:
        return False


class Relay:
    """All partition readers of one gateway process."""

    def __init__(self, nodes: NodeConnections, *, block_ms: int, count: int, buffer_events: int) -> None:
        self._nodes = nodes
        self._buffer_events = buffer_events
        groups = [(p,) for p in range(keys.PARTITIONS)] if nodes.cluster else [tuple(range(keys.PARTITIONS))]
        self._readers = [PartitionReader(group, nodes, block_ms, count) for group in groups]
        self._reader_of = [reader for reader in self._readers for _ in reader.partitions]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(r.run(), name=f"relay partitions {r.label}") for r in self._readers]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._nodes.close()

    def subscribe(self, request_id: str, cursor: int) -> Subscription:
        partition = keys.partition_of(request_id)
        sub = Subscription(keys.RequestKeys.of(request_id).events.encode(), partition, cursor, self._buffer_events)
        self._reader_of[partition].add(sub)
        return sub

    def nudge(self, request_id: str) -> None:
        """Make the reader of this request's partition re-issue its XREAD now."""
        self._reader_of[keys.partition_of(request_id)].wake()

    def unsubscribe(self, sub: Subscription) -> None:
        self._reader_of[sub.partition].remove(sub)

    @property
    def subscriptions(self) -> int:
        return sum(len(subs) for r in self._readers for subs in r._subs.values())
