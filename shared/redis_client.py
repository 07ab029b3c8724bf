"""Building Redis clients from a URL, and the fail-fast reachability check every process runs at start."""

from __future__ import annotations

import redis
import redis.asyncio as aredis


class RedisUnreachableError(RuntimeError):
    """Redis could not be reached; the message says where and why."""


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.partition(":")[0]
    return f"{scheme}://{user + ':***' if user else '***'}@{host}"


def connect(url: str, *, socket_timeout_s: float | None = 10.0, max_connections: int = 256) -> aredis.Redis:
    """An asyncio client with a bounded pool; binary replies (payloads are msgpack)."""
    return aredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=5.0,
        max_connections=max_connections,
        health_check_interval=30,
    )


def check_reachable(url: str, *, timeout_s: float = 3.0) -> None:
    """Ping Redis once, synchronously; raise :class:`RedisUnreachableError` with a clear message."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    except ValueError as exc:
        raise RedisUnreachableError(f"invalid Redis URL {redact(url)!r}: {exc}") from exc
    try:
        client.ping()
    except redis.RedisError as exc:
        raise RedisUnreachableError(f"cannot reach Redis at {redact(url)}: {exc}") from exc
    finally:
        client.close()
