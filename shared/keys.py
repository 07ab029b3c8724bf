"""Every Redis key name tokenspool uses, and the request ids they are built from.

Keys that one command or script touches together share a ``{hash tag}``, so the design runs on
Redis Cluster unchanged:

- a request's event stream, metadata hash, job record and attachments are tagged with its *partition*
  (``{p0}`` .. ``{p15}``), taken from the first hex digit of the request id; a gateway can therefore
  read the event streams of all its live connections in at most 16 multi-key XREADs, one per slot;
- a model's request queue and its dead letters are tagged by the model name;
- the worker registry and the operator commands share ``{reg}``; each idempotency record stands alone;
- an owner's (API key's) rate-limit counters and open-stream leases are tagged by the owner.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Final, Literal

PREFIX: Final = "ts"
PARTITIONS: Final = 16
WORKER_GROUP: Final = "workers"
"""The consumer group every worker of a model reads its queue through."""

RequestKind = Literal["chat", "completion", "response"]

_ID_PREFIX: Final[dict[str, str]] = {"chat": "chatcmpl-", "completion": "cmpl-", "response": "resp_"}
_REQUEST_ID_RE: Final = re.compile(r"(chatcmpl-|cmpl-|resp_)([0-9a-f]{32})")


def new_request_id(kind: RequestKind) -> str:
    """A fresh request id with 128 random bits, prefixed as OpenAI prefixes its ids (``resp_`` for a
    Responses API response, which is a chat request underneath)."""
    return _ID_PREFIX[kind] + secrets.token_hex(16)


def is_request_id(value: str) -> bool:
    return _REQUEST_ID_RE.fullmatch(value) is not None


def partition_of(request_id: str) -> int:
    """The partition (0..15) of a request: the first hex digit of its random part."""
    match = _REQUEST_ID_RE.fullmatch(request_id)
    if match is None:
        raise ValueError(f"not a tokenspool request id: {request_id!r}")
    return int(match.group(2)[0], 16)


def partition_slot_key(partition: int) -> str:
    """A key in the hash slot of ``partition``: every request stream of the partition lives in this slot,
    so this names the cluster node a partition's reader must talk to."""
    return f"{PREFIX}:{{p{partition}}}"


@dataclass(frozen=True, slots=True)
class RequestKeys:
    """The keys of one request; all four share one hash slot so one script can touch them together. Built once
    per running request by a worker (its appends name them every engine step)."""

    request_id: str
    partition: int
    events: str
    meta: str
    job: str
    attached: str
    """Sorted set: connection id -> until when (ms) a client counts as attached (refreshed while connected)."""

    @classmethod
    def of(cls, request_id: str) -> RequestKeys:
        partition = partition_of(request_id)
        base = f"{PREFIX}:{{p{partition}}}:r:{request_id}"
        return cls(
            request_id=request_id,
            partition=partition,
            events=f"{base}:ev",
            meta=f"{base}:meta",
            job=f"{base}:job",
            attached=f"{base}:att",
        )


def queue_key(model: str) -> str:
    """The request queue (a stream) of one model, read by the workers' consumer group."""
    return f"{PREFIX}:q:{{{model}}}"


def commands_key() -> str:
    """Operator commands waiting for workers: worker id -> command (``drain``, ``migrate``, ``shed N``)."""
    return f"{PREFIX}:{{reg}}:commands"


def dead_letter_key(model: str) -> str:
    """Requests of ``model`` given up after too many attempts (a stream, for operators)."""
    return f"{PREFIX}:dead:{{{model}}}"


def workers_key() -> str:
    """The hash of registered workers: worker id -> wire-encoded WorkerInfo."""
    return f"{PREFIX}:{{reg}}:workers"


def idempotency_key(owner: str, client_key: str) -> str:
    """Maps an Idempotency-Key (scoped to its owner) to the request it created."""
    digest = hashlib.sha256(f"{owner}\0{client_key}".encode()).hexdigest()[:32]
    return f"{PREFIX}:idem:{{{digest}}}"


def rate_window_key(owner: str, window: int) -> str:
    """Requests an owner (an API key's id) submitted in one fixed one-minute window (a counter)."""
    return f"{PREFIX}:rl:{{{owner}}}:{window}"


def open_streams_key(owner: str) -> str:
    """The streams an owner has open on any gateway: sorted set stream id -> lease end (ms), renewed by the
    gateway holding the stream, so a gateway that dies frees its streams' places when their leases end."""
    return f"{PREFIX}:streams:{{{owner}}}"


def stream_entry_id(seq: int) -> str:
    """The Redis stream id of event number ``seq`` (1-based): explicit ids make appends exactly-once."""
    return f"{seq}-0"


def seq_of_entry_id(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


def event_id(request_id: str, seq: int) -> str:
    """The SSE ``id:`` of an event. Opaque to clients; it names its request so a resume can be checked."""
    return f"{request_id}:{seq}"


def parse_event_id(value: str) -> tuple[str, int]:
    """Split an SSE event id into (request id, sequence number); ValueError when it is not one of ours."""
    request_id, sep, seq_text = value.strip().rpartition(":")
    digits = seq_text.isascii() and seq_text.isdigit()
    if not sep or not is_request_id(request_id) or not digits or len(seq_text) > 12:
        raise ValueError(f"not a tokenspool event id: {value!r}")
    return request_id, int(seq_text)
