"""The request record in Redis and the atomic operations on it, shared by gateways and workers.

A request lives in four keys of one hash slot (see :mod:`tokenspool.shared.keys`): its metadata hash, its job
record, its event stream, and the connections attached to it. Every state change that touches the event
stream runs as one Lua script (``shared/lua/``), so an append, its sequence check, its fencing check and
the state change it implies happen together or not at all. A model's queue is :mod:`tokenspool.shared.queue`'s.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis.exceptions
from redis.commands.core import AsyncScript

from tokenspool.shared import keys, lua, queue, wire
from tokenspool.shared.aio import GroupCommit
from tokenspool.shared.redis_client import AsyncRedis, is_cluster
from tokenspool.shared.settings import CommonSettings

RequestState = Literal["queued", "running", "done", "cancelled", "failed"]
TERMINAL_STATES: Final = frozenset({"done", "cancelled", "failed"})
StreamFormat = Literal["chat", "completion", "simple", "response"]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class RequestMeta:
    """The metadata hash of a request, parsed."""

    request_id: str
    state: RequestState
    kind: str
    stream_format: StreamFormat
    model: str
    owner: str
    include_usage: bool
    created_s: int
    enqueued_ms: int
    started_ms: int
    finished_ms: int
    worker: str
    attempt: int
    last_seq: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str
    cancel_requested: bool
    choices: int = 1
    """The request's ``n`` (stored only when above 1): a chat stream opens with one role chunk per choice."""
    continuous_usage: bool = False
    """Every chunk carries the usage so far (``stream_options.continuous_usage_stats``; stored only when set)."""
    role: str = "assistant"
    """The reply's role (a chat without a generation prompt answers in its last message's role, as vLLM does;
    stored only when not the assistant's)."""
    token_ids: bool = False
    """Answers show token ids (vLLM's ``return_token_ids``; stored only when set)."""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_hash(cls, request_id: str, raw: Mapping[bytes, bytes]) -> RequestMeta:
        def text(name: str) -> str:
            return raw.get(name.encode(), b"").decode()

        def number(name: str) -> int:
            return int(raw.get(name.encode(), b"0") or 0)

        return cls(
            request_id=request_id,
            state=text("state"),  # type: ignore[arg-type]
            kind=text("kind"),
            stream_format=text("format"),  # type: ignore[arg-type]
            model=text("model"),
            owner=text("owner"),
            include_usage=text("include_usage") == "1",
            created_s=number("created_s"),
            enqueued_ms=number("enqueued_ms"),
            started_ms=number("started_ms"),
            finished_ms=number("finished_ms"),
            worker=text("worker"),
            attempt=number("attempt"),
            last_seq=number("last_seq"),
            finish_reason=text("finish_reason"),
            prompt_tokens=number("prompt_tokens"),
            completion_tokens=number("completion_tokens"),
            error=text("error"),
            cancel_requested=text("cancel") == "1",
            choices=number("choices") or 1,
            continuous_usage=text("continuous_usage") == "1",
            role=text("role") or "assistant",
            token_ids=text("token_ids") == "1",
        )


# The refusal codes of shared/lua/append.lua.
APPEND_GONE: Final = -1
APPEND_FENCED: Final = -2
APPEND_ENDED: Final = -3
APPEND_OUT_OF_SEQUENCE: Final = -4


class NotReplicatedError(redis.exceptions.TimeoutError):
    """Fewer replicas than ``redis_min_replicas_acked`` confirmed a write within
    ``redis_replica_ack_timeout_ms``: the primary has it, but a failover could still lose it, so it does not
    count as written (a worker resends it; a gateway answers 503, as for an unreachable Redis)."""


@dataclass(frozen=True, slots=True)
class ReplicaAcks:
    """How many replicas must confirm a write (Redis ``WAIT``) before it counts, and for how long to wait."""

    replicas: int
    timeout_ms: int

    def command(self) -> tuple[str, int, int]:
        """The ``WAIT`` that ends a pipeline: it answers once the replicas have every write sent before it on
        this connection (and everything the primary wrote before those), or at the timeout."""
        return ("WAIT", self.replicas, self.timeout_ms)

    def check(self, reply: Any) -> NotReplicatedError | None:
        """None when the ``WAIT`` reply counts enough replicas; else the error that says how many did."""
        if isinstance(reply, Exception):
            return NotReplicatedError(f"WAIT failed: {reply}")
        if int(reply) >= self.replicas:
            return None
        return NotReplicatedError(
            f"confirmed by {int(reply)} of the {self.replicas} replicas required within {self.timeout_ms} ms"
        )


@dataclass(frozen=True, slots=True)
class FinalState:
    """What the last event of a request sets in its metadata."""

    state: RequestState
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


@dataclass(frozen=True, slots=True)
class Append:
    """Events for one running request, written by the worker holding ``attempt``."""

    keys: keys.RequestKeys
    attempt: int
    first_seq: int
    payloads: list[bytes]
    final: FinalState | None = None
    refresh_ttl: bool = True
    """Renew the running TTL of the request's keys (a worker does it now and then, not every step)."""

    @property
    def request_id(self) -> str:
        return self.keys.request_id


class RequestStore:
    """The operations on request records; one per process, built on that process's Redis client."""

    def __init__(self, client: AsyncRedis, settings: CommonSettings) -> None:
        self.redis = client
        # redis-py's annotations do not model binary replies; replies are checked where they are parsed.
        self._r: Any = client
        self.retention_ms = int(settings.retention_s * 1000)
        self.meta_ttl_ms = int((settings.retention_s + settings.tombstone_s) * 1000)
        self.running_ttl_ms = int(settings.request_ttl_s * 1000)
        self.replica_acks: ReplicaAcks | None = (
            ReplicaAcks(settings.redis_min_replicas_acked, settings.redis_replica_ack_timeout_ms)
            if settings.redis_min_replicas_acked > 0
            else None
        )
        """Set: creates and appends count only once that many replicas have them (never on a cluster: the
        settings refuse it)."""
        self._create: AsyncScript = lua.register(client, "create")
        self._append: AsyncScript = lua.register(client, "append")
        self._claim: AsyncScript = lua.register(client, "claim")
        self._cancel: AsyncScript = lua.register(client, "cancel")
        self._claims = GroupCommit(self._claim_all, "claiming requests")

    # -- gateway side -------------------------------------------------------------------------------

    async def create(
        self,
        job: wire.Job,
        *,
        stream_format: StreamFormat,
        owner: str,
        include_usage: bool,
        choices: int = 1,
        role: str = "assistant",
        token_ids: bool = False,
    ) -> RequestMeta:
        """Record a new request, then enqueue it on its model's queue; the metadata written (so a stream of
        it can start without reading it back).

        On one server, one script call (``create.lua``: the record and the queue entry, atomically). On a
        cluster, the script for the record, then the queue entry: the queue may live on another node than
        the request's keys, so it is written only once the record exists (a worker could otherwise pull the
        entry before the request it names). With :attr:`replica_acks` set, the call ends with one ``WAIT``."""
        rk = keys.RequestKeys.of(job.request_id)
        payload = wire.encode(job)
        # What a claim or an append changes starts here (the script sets it only where absent, so a create
        # sent again cannot undo a worker's progress).
        progress: dict[str, Any] = {"state": "queued", "attempt": 0, "last_seq": 0}
        fields: dict[str, Any] = {
            "kind": job.kind,
            "format": stream_format,
            "model": job.model,
            "owner": owner,
            "include_usage": "1" if include_usage else "0",
            "created_s": job.created_s,
            "enqueued_ms": job.enqueued_ms,
        }
        if choices > 1:
            fields["choices"] = choices
        if job.continuous_usage:
            fields["continuous_usage"] = "1"
        if role != "assistant":
            fields["role"] = role
        if token_ids:
            fields["token_ids"] = "1"
        cluster = is_cluster(self.redis)
        script_keys = [rk.meta, rk.job] if cluster else [rk.meta, rk.job, keys.queue_key(job.model)]
        args = [self.running_ttl_ms, payload, *(item for pair in fields.items() for item in pair)]
        try:
            await self._create_record(script_keys, args)
            if cluster:
                await self._r.xadd(keys.queue_key(job.model), {"d": payload})
        except BaseException:
            await self._r.delete(rk.meta, rk.job)
            raise
        written = {**fields, **progress}
        return RequestMeta.from_hash(job.request_id, {k.encode(): str(v).encode() for k, v in written.items()})

    async def _create_record(self, script_keys: list[str], args: list[Any]) -> None:
        """One call of ``create.lua`` (redis-py's script object loads the script on NOSCRIPT, after a restart
        or a failover); with :attr:`replica_acks`, pipelined with the ``WAIT`` that counts the replicas."""
        if self.replica_acks is None:
            await self._create(keys=script_keys, args=args)
            return
        for _ in range(2):
            pipe = self._r.pipeline(transaction=False)
            pipe.execute_command("EVALSHA", self._create.sha, len(script_keys), *script_keys, *args)
            pipe.execute_command(*self.replica_acks.command())
            created, replicas = await pipe.execute(raise_on_error=False)
            if isinstance(created, redis.exceptions.NoScriptError):
                await lua.load(self.redis, (self._create,))
                continue
            if isinstance(created, Exception):
                raise created
            if (shortfall := self.replica_acks.check(replicas)) is not None:
                raise shortfall
            return
        raise redis.exceptions.NoScriptError("create.lua was not loaded on the primary")

    async def meta(self, request_id: str) -> RequestMeta | None:
        raw = await self._r.hgetall(keys.RequestKeys.of(request_id).meta)
        return RequestMeta.from_hash(request_id, raw) if raw else None

    async def job(self, request_id: str) -> wire.Job | None:
        """The request's job record (what it was asked), kept as long as its events."""
        raw = await self._r.get(keys.RequestKeys.of(request_id).job)
        return wire.decode(raw, wire.Job) if raw is not None else None

    async def delete(self, request_id: str, owner: str) -> bool:
        """Forget the caller's request: its metadata, job, events and attachments. False when it is unknown
        or another owner's. A request still running loses its record: its worker's next append is refused
        (``gone``), so it stops and acknowledges its queue entry; a queued one is skipped when pulled."""
        rk = keys.RequestKeys.of(request_id)
        recorded = await self._r.hget(rk.meta, "owner")
        if recorded is None or recorded.decode() != owner:
            return False
        await self._r.delete(rk.meta, rk.job, rk.events, rk.attached)
        return True

    async def state(self, request_id: str) -> tuple[str, int]:
        """(state, last_seq) in one small read; ('', 0) for an unknown request."""
        state, last_seq = await self._r.hmget(keys.RequestKeys.of(request_id).meta, ["state", "last_seq"])
        return (state or b"").decode(), int(last_seq or 0)

    async def cancel(self, request_id: str, owner: str) -> tuple[int, str]:
        """A client's cancel: (1, state) ended now, (2, _) flagged for its worker, (0, state) already ended,
        (-1, _) unknown or owned by someone else (checked in the same script, so it cannot race)."""
        return await self._end_from_outside(
            request_id, "cancelled", "cancelled", "cancelled by the client", False, owner
        )

    async def expire_queued(self, request_id: str, message: str) -> bool:
        """End a request that waited in the queue too long (only while it is still queued)."""
        code, _ = await self._end_from_outside(request_id, "queue_timeout", "failed", message, True, "")
        return code == 1

    async def _end_from_outside(
        self, request_id: str, error_type: str, state: str, message: str, queued_only: bool, owner: str
    ) -> tuple[int, str]:
        rk = keys.RequestKeys.of(request_id)
        payload = wire.encode(wire.Event("error", error_type=error_type, message=message))
        code, result = await self._cancel(
            keys=[rk.meta, rk.events, rk.job],
            args=[
                now_ms(),
                payload,
                self.retention_ms,
                self.meta_ttl_ms,
                100_000,
                state,
                message,
                "1" if queued_only else "0",
                owner,
            ],
        )
        return int(code), result.decode() if isinstance(result, bytes) else str(result)

    async def attach(self, entries: list[tuple[str, str, int]]) -> None:
        """Mark connections attached until the given times: [(request id, connection id, until ms)]."""
        if not entries:
            return
        pipe = self._r.pipeline(transaction=False)
        for request_id, connection_id, until_ms in entries:
            key = keys.RequestKeys.of(request_id).attached
            pipe.zadd(key, {connection_id: until_ms})
            pipe.pexpire(key, self.running_ttl_ms)
        await pipe.execute()

    async def unattended(self, request_ids: list[str], now: int) -> list[str]:
        """Of these requests, those whose every attachment has run out (requests never attached to are
        left alone)."""
        if not request_ids:
            return []
        pipe = self._r.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.zrange(keys.RequestKeys.of(request_id).attached, -1, -1, withscores=True)
        latest = await pipe.execute()
        return [rid for rid, top in zip(request_ids, latest, strict=True) if top and top[0][1] < now]

    async def queue_waiting(self, model: str) -> int:
        """Requests of ``model`` not yet taken by any worker."""
        return await queue.waiting(self.redis, model)

    async def read_events(self, request_id: str, after_seq: int, count: int) -> list[tuple[int, bytes]]:
        """Up to ``count`` stored events after ``after_seq``, as (seq, payload), in one range read."""
        entries = await self._r.xrange(
            keys.RequestKeys.of(request_id).events, min=f"({keys.stream_entry_id(after_seq)}", max="+", count=count
        )
        return [(keys.seq_of_entry_id(entry_id), fields[b"d"]) for entry_id, fields in entries]

    # -- worker side --------------------------------------------------------------------------------

    async def claim(
        self, request_id: str, worker_id: str, entry_id: bytes = b"", *, takeover: bool = False
    ) -> tuple[int, int]:
        """Take a queued request from its queue entry ``entry_id`` (or, with ``takeover``, a running one
        whose worker lost its lease); (attempt, last_seq), attempt 0 when it cannot be taken. Safe to send
        again: a repeated claim by the same worker of the same entry answers like the first. Claims made
        together (the entries of one queue read) go in one round trip (:class:`GroupCommit`)."""
        return await self._claims((request_id, worker_id, entry_id, takeover))

    async def _claim_all(self, claims: list[tuple[str, str, bytes, bool]]) -> list[tuple[int, int] | Exception]:
        """One claim script call per claim, pipelined, by hash; claims that met NOSCRIPT (the server lost
        its scripts: a restart, a failover) are sent again once the scripts are loaded (the script did not
        run, so nothing was claimed)."""
        results = await self._send_claims(claims)
        missing = [i for i, result in enumerate(results) if isinstance(result, redis.exceptions.NoScriptError)]
        if missing:
            await self.load_scripts()
            for i, result in zip(missing, await self._send_claims([claims[i] for i in missing]), strict=True):
                results[i] = result
        return [result if isinstance(result, Exception) else (int(result[0]), int(result[1])) for result in results]

    async def _send_claims(self, claims: list[tuple[str, str, bytes, bool]]) -> list[Any]:
        pipe: Any = self._r.pipeline(transaction=False)
        now = now_ms()
        for request_id, worker_id, entry_id, takeover in claims:
            meta_key = keys.RequestKeys.of(request_id).meta
            pipe.execute_command(
                "EVALSHA", self._claim.sha, 1, meta_key, worker_id, now, "1" if takeover else "0", entry_id
            )
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def all_events(self, request_id: str, batch: int = 1024) -> list[wire.Event]:
        """Every stored event of a request, read in bounded batches (what a takeover continues from)."""
        events: list[wire.Event] = []
        cursor = 0
        while True:
            items = await self.read_events(request_id, cursor, batch)
            events.extend(wire.decode(payload, wire.Event) for _seq, payload in items)
            if len(items) < batch:
                return events
            cursor = items[-1][0]

    async def fail_abandoned(self, request_id: str, worker_id: str, message: str) -> bool:
        """End a request no worker could finish: take it over once more and write its terminal error."""
        attempt, last_seq = await self.claim(request_id, worker_id, takeover=True)
        if attempt == 0:
            return False
        payload = wire.encode(wire.Event("error", error_type="failed", message=message))
        final = FinalState("failed", error=message)
        (result,) = await self.append_many(
            [Append(keys.RequestKeys.of(request_id), attempt, last_seq + 1, [payload], final)], 100_000
        )
        if isinstance(result, Exception):
            raise result
        return result[0] >= 0

    async def append_many(self, appends: list[Append], maxlen: int) -> list[tuple[int, int] | Exception]:
        """:meth:`append_batch`, with every append the replicas did not confirm in time answered by the
        :class:`NotReplicatedError` that says so (for callers that only resend)."""
        results, shortfall = await self.append_batch(appends, maxlen)
        if shortfall is None:
            return results
        return [result if isinstance(result, Exception) else shortfall for result in results]

    async def append_batch(
        self, appends: list[Append], maxlen: int
    ) -> tuple[list[tuple[int, int] | Exception], NotReplicatedError | None]:
        """Run these appends in one round trip: one script call per partition (its keys share a hash slot).

        The answer for each append, in order, is ``(last_seq, cancel_requested)`` on success, ``(code,
        last_seq)`` with a negative code when the request refused it (see ``shared/lua/append.lua``), or the Redis
        error its partition's call met (NOSCRIPT from a node that does not know the script: the caller
        runs :meth:`load_scripts` and sends again). The script is called by hash, as a raw EVALSHA that a
        cluster pipeline routes by its keys (no ``SCRIPT EXISTS`` round trip per call, as redis-py's script
        helper would make; and that helper is refused in cluster pipelines).

        With :attr:`replica_acks` set, the round trip ends with one ``WAIT``; the second item is then the
        :class:`NotReplicatedError` when it counted too few replicas: what the answers say is written is on
        the primary only, and counts as written once a later round trip's ``WAIT`` succeeds."""
        groups: dict[int, list[int]] = {}
        for index, item in enumerate(appends):
            groups.setdefault(item.keys.partition, []).append(index)
        calls: list[list[int]] = list(groups.values())
        pipe: Any = self._r.pipeline(transaction=False)
        for members in calls:
            script_keys, args = self._append_call([appends[i] for i in members], maxlen)
            pipe.execute_command("EVALSHA", self._append.sha, len(script_keys), *script_keys, *args)
        if self.replica_acks is not None:
            pipe.execute_command(*self.replica_acks.command())  # one WAIT per round trip (engine step)
        results = await pipe.execute(raise_on_error=False)
        shortfall = self.replica_acks.check(results.pop()) if self.replica_acks is not None else None
        out: list[tuple[int, int] | Exception] = [ValueError("not sent")] * len(appends)
        for members, result in zip(calls, results, strict=True):
            for position, index in enumerate(members):
                if isinstance(result, Exception):
                    out[index] = result
                else:
                    out[index] = (int(result[2 * position]), int(result[2 * position + 1]))
        return out, shortfall

    def _append_call(self, group: list[Append], maxlen: int) -> tuple[list[str], list[Any]]:
        script_keys: list[str] = []
        args: list[Any] = [maxlen, self.running_ttl_ms, self.retention_ms, self.meta_ttl_ms, now_ms()]
        for item in group:
            rk = item.keys
            script_keys += [rk.meta, rk.events, rk.job]
            final = item.final
            final_fields: list[Any] = (
                [final.state, final.finish_reason, final.prompt_tokens, final.completion_tokens, final.error]
                if final is not None
                else ["", "", 0, 0, ""]
            )
            refresh = 1 if item.refresh_ttl else 0
            args += [item.attempt, item.first_seq, len(item.payloads), refresh, *final_fields, *item.payloads]
        return script_keys, args

    async def load_scripts(self) -> None:
        """Load this store's scripts into the server (every primary of a cluster): after a restart, a
        failover or a new node, pipelined EVALSHAs answer NOSCRIPT until this ran."""
        await lua.load(self.redis, (self._create, self._append, self._claim, self._cancel))

    async def cancel_flags(self, request_ids: list[str]) -> dict[str, bool]:
        """Which of these running requests a client asked to cancel."""
        if not request_ids:
            return {}
        pipe = self._r.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.hget(keys.RequestKeys.of(request_id).meta, "cancel")
        flags = await pipe.execute()
        return {rid: flag == b"1" for rid, flag in zip(request_ids, flags, strict=True)}
