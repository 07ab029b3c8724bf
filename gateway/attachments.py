"""Which clients are attached to which requests, kept in Redis so that any worker can tell a request
that somebody still reads (or may come back to, within the grace period) from a zombie generation.

Each connection is a member of its request's ``attached`` sorted set, scored with the time until which
it counts as attached. While connected, the gateway renews that every ``attach_refresh_s``, to three
refresh periods plus the grace period ahead (a gateway that dies leaves its clients the grace period to
reconnect elsewhere); when the client leaves, its score becomes "now + grace".
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine
from typing import Any

import redis.exceptions

from tokenspool.shared.aio import reraise_if_cancelling
from tokenspool.shared.store import RequestStore, now_ms

log = logging.getLogger("tokenspool.gateway.attachments")


class Attachments:
    def __init__(self, store: RequestStore, *, refresh_s: float, grace_s: float) -> None:
        self._store = store
        self._refresh_s = refresh_s
        self._grace_ms = int(grace_s * 1000)
        self._live: dict[str, str] = {}  # connection id -> request id
        self._pending: set[asyncio.Task[None]] = set()
        self._attaching: dict[str, asyncio.Task[None]] = {}  # connection id -> its attach write
        self._task: asyncio.Task[None] | None = None

    def _attached_until(self) -> int:
        return now_ms() + int(self._refresh_s * 3000) + self._grace_ms

    def attach(self, request_id: str, *, announce: bool = True) -> str:
        """Count a new connection as attached. With ``announce`` the write goes on in the background, off
        the path to the first token; without it (the stream of a request submitted on this connection) it
        waits for the next renewal: a request nobody has attached to yet is never taken for a zombie, so a
        short request costs no attachment write at all (nor does its end: see :meth:`detach`)."""
        connection_id = secrets.token_hex(8)
        self._live[connection_id] = request_id
        if announce:
            self._attaching[connection_id] = self._background(
                self._write([(request_id, connection_id, self._attached_until())])
            )
        return connection_id

    def detach(self, connection_id: str, *, request_ended: bool = False) -> None:
        """Start the grace period of a connection that ended (written in the background: this runs while
        the connection's task is being torn down), after its attach landed, so the two cannot swap.

        A connection that read its request's terminal event writes nothing: attachments only decide
        whether a running request is cancelled, and this one runs no more (a short request thus costs no
        attachment write at all, and no round trip of its gateway after its last event)."""
        request_id = self._live.pop(connection_id, None)
        attaching = self._attaching.pop(connection_id, None)
        if request_id is None or request_ended:
            return
        self._background(self._after(attaching, [(request_id, connection_id, now_ms() + self._grace_ms)]))

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[None]) -> None:
        """Forget a finished write, logging its failure (none dies unobserved: Redis errors other than an
        unreachable server, e.g. a read-only replica during a failover, are not handled in ``_write``)."""
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("could not record attachments: %s", task.exception(), exc_info=task.exception())

    async def _after(self, earlier: asyncio.Task[None] | None, entries: list[tuple[str, str, int]]) -> None:
        if earlier is not None:
            await asyncio.gather(earlier, return_exceptions=True)
        await self._write(entries)

    async def _write(self, entries: list[tuple[str, str, int]]) -> None:
        try:
            await self._store.attach(entries)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            reraise_if_cancelling()
            log.warning("could not record %d attachment(s): %s", len(entries), exc)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            until = self._attached_until()
            await self._write([(rid, cid, until) for cid, rid in list(self._live.items())])

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever(), name="attachments")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._pending, return_exceptions=True)
