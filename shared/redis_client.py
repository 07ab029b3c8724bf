"""Building Redis clients: the one factory every process uses, for a single server or a Redis Cluster,
plain or TLS, with or without an ACL user; and the fail-fast reachability check every process runs at start.

The URL says everything about where and how to connect, so that it is the one thing handed from process to
process: ``redis://[user:password@]host:port/db`` (one server), ``rediss://`` (TLS), and
``redis+cluster://`` / ``rediss+cluster://`` (a Redis Cluster, reached through any of its nodes as a seed;
the client discovers the others), and ``redis+sentinel://host:port,host:port/service[/db]`` /
``rediss+sentinel://`` (a primary managed by Redis Sentinel: the client asks the sentinels where the primary
of ``service`` is, and asks again after a failover). The only other input is the CA bundle that verifies a TLS server
(``TOKENSPOOL_REDIS_TLS_CA_FILE``), which is a file path and would not read well inside a URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar, cast
from urllib.parse import urlsplit

import hiredis
import redis
import redis.asyncio as aredis
import redis.asyncio.retry
import redis.exceptions
import redis.retry
import redis.sentinel
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool, SSLConnection
from redis.asyncio.connection import parse_url as parse_async_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff

from tokenspool.shared.settings import (
    REDIS_SCHEMES,
    SENTINEL_SCHEMES,
    CommonSettings,
    SentinelURL,
    parse_sentinel_url,
    redis_url_problem,
)

AsyncRedis: TypeAlias = "aredis.Redis | aredis.RedisCluster"
SyncRedis: TypeAlias = "redis.Redis | redis.RedisCluster"
Address: TypeAlias = tuple[str, int]
_Connection = TypeVar("_Connection", bound=AbstractConnection)


UNREACHABLE: Final = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
"""What a command raises when Redis cannot be reached (after the client's own retries)."""


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


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where Redis is and how to reach it: the URL (its scheme selects cluster mode and TLS) and the CA
    bundle for TLS."""

    url: str
    tls_ca_file: str = ""

    def __post_init__(self) -> None:
        problem = redis_url_problem(self.url, self.tls_ca_file)
        if problem is not None:
            raise ValueError(f"{redact(self.url)!r}: {problem}")

    @classmethod
    def of(cls, settings: CommonSettings) -> RedisTarget:
        assert settings.redis_url is not None, "the CLI checks that a Redis URL is set"
        return cls(settings.redis_url, settings.redis_tls_ca_file)

    @property
    def cluster(self) -> bool:
        return REDIS_SCHEMES[urlsplit(self.url).scheme]

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme.startswith("rediss")

    @property
    def sentinel(self) -> SentinelURL | None:
        """The sentinels and service of a ``redis+sentinel://`` URL; None for any other scheme."""
        return parse_sentinel_url(self.url) if urlsplit(self.url).scheme in SENTINEL_SCHEMES else None

    @property
    def plain_url(self) -> str:
        """The URL redis-py understands (the ``+cluster`` marker removed)."""
        return self.url.replace("+cluster://", "://", 1)

    def tls_kwargs(self) -> dict[str, Any]:
        return {"ssl_ca_certs": self.tls_ca_file} if self.tls and self.tls_ca_file else {}


def is_cluster(client: AsyncRedis) -> bool:
    return isinstance(client, aredis.RedisCluster)


# -- The connection every pool makes ------------------------------------------------------------------


class TokenspoolConnection(AbstractConnection):
    """redis-py's asyncio connection with two changes, made on every connection of every pool (one server,
    TLS, Sentinel, cluster nodes, relay readers) by :func:`tokenspool_connection`:

    - **Commands are packed with hiredis's C packer.** redis-py packs in Python (an encode call and a bytes
      join per argument): in the profile of a worker at 100 streams that was a fifth of its CPU, the append
      scripts being ten-argument commands sent every engine step. hiredis (already here: it parses the
      replies) packs the same bytes about six times faster. What hiredis does not take goes to redis-py's
      packer, unchanged: a command name holding a space (``CLIENT UNBLOCK``, which redis-py splits into two
      arguments), and an argument of another type than str, bytes, int, float or memoryview (``None``, a
      bool: redis-py refuses them with ``DataError``). Both encode text as UTF-8, strictly.
    - **A send keeps its caller's cancellation.** redis-py bounds a send with ``asyncio.wait_for``, which on
      Python 3.11 runs the send as a task of its own and, when the caller is cancelled just as that task
      finishes, returns its result instead of raising: the cancellation is lost. A relay reader cancelled
      while re-issuing its ``XREAD`` then went on reading, and closing the gateway waited on it for ever. The
      send here writes, then waits for the buffer to drain under ``asyncio.timeout`` (only when something is
      left to drain: after a write that went out whole there is nothing to wait for). No task per command,
      so it is also cheaper. Connecting and the idle health check stay redis-py's."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if isinstance(name, str) and " " in name:
            return super().pack_command(*args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return super().pack_command(*args)

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        if not self.is_connected:
            await self.connect()  # type: ignore[no-untyped-call]
        if check_health:
            await self.check_health()  # type: ignore[no-untyped-call]
        writer: Any = self._writer
        try:
            if isinstance(command, str):
                command = command.encode()
            if isinstance(command, bytes):
                command = [command]
            writer.writelines(command)
            if self.socket_timeout and writer.transport.get_write_buffer_size():
                async with asyncio.timeout(self.socket_timeout):
                    await writer.drain()
            else:
                await writer.drain()  # nothing left to write: it returns at once
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise redis.exceptions.TimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)
            raise redis.exceptions.ConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            await self.disconnect(nowait=True)  # a partly sent command leaves the connection unusable
            raise


def tokenspool_connection(connection_class: type[_Connection]) -> type[_Connection]:
    """``connection_class`` (plain, TLS, Unix socket, Sentinel-managed) as a :class:`TokenspoolConnection`: a
    subclass made once per pool (a handful per process)."""
    if issubclass(connection_class, TokenspoolConnection):
        return connection_class
    name = f"Tokenspool{connection_class.__name__}"
    return cast(type[_Connection], type(name, (TokenspoolConnection, connection_class), {}))


# -- Sentinel ---------------------------------------------------------------------------------------


class SentinelPrimaryPool(SentinelConnectionPool, aredis.BlockingConnectionPool):
    """The pool of a Sentinel-managed primary: every new connection asks the sentinels where the primary is
    (redis-py's :class:`SentinelConnectionPool`), and, like the one-server pool, past ``max_connections`` a
    command waits for a connection to come back instead of failing at once. Closing it also closes the
    connections to the sentinels, which belong to no one else. Its connections are :class:`TokenspoolConnection`s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.connection_class = tokenspool_connection(self.connection_class)

    async def aclose(self) -> None:
        await super().aclose()
        await self.sentinel_manager.aclose()


class _SentinelPrimaryPoolSync(redis.sentinel.SentinelConnectionPool):
    def disconnect(self, inuse_connections: bool = True) -> None:
        super().disconnect(inuse_connections)
        for sentinel in self.sentinel_manager.sentinels:
            sentinel.close()


def _sentinel_logins(
    target: RedisTarget, where: SentinelURL, common: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Connection options for the sentinels and for the primary. The URL's user and password log in to the
    primary only (sentinels usually run without them); TLS (``rediss+sentinel://``) and the socket
    timeouts apply to both."""
    tls = {"ssl_ca_certs": target.tls_ca_file} if where.tls and target.tls_ca_file else {}
    to_sentinels: dict[str, Any] = {k: v for k, v in common.items() if k.startswith("socket_")}
    to_primary: dict[str, Any] = {**common, "db": where.db, "username": where.username, "password": where.password}
    if where.tls:
        to_sentinels.update(ssl=True, **tls)
        to_primary.update(ssl=True, **tls)
    return to_sentinels, to_primary


def sentinel_primary(
    target: RedisTarget, where: SentinelURL, common: dict[str, Any], *, pool_timeout_s: float
) -> aredis.Redis:
    """An asyncio client of the primary the sentinels name for ``where.service``: a connection broken by a
    failover is replaced by one to the newly elected primary (redis-py's Sentinel client), and a connection
    to a demoted primary (``READONLY``) is dropped the same way."""
    to_sentinels, to_primary = _sentinel_logins(target, where, common)
    manager = Sentinel(list(where.sentinels), sentinel_kwargs=to_sentinels)  # type: ignore[no-untyped-call]
    client: aredis.Redis = manager.master_for(
        where.service, connection_pool_class=SentinelPrimaryPool, timeout=pool_timeout_s, **to_primary
    )
    return client


def sentinel_primary_sync(target: RedisTarget, where: SentinelURL, common: dict[str, Any]) -> redis.Redis:
    """A blocking client of the primary the sentinels name (operator commands, tests)."""
    to_sentinels, to_primary = _sentinel_logins(target, where, common)
    manager = redis.sentinel.Sentinel(list(where.sentinels), sentinel_kwargs=to_sentinels)  # type: ignore[no-untyped-call]
    client: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call]
        where.service, connection_pool_class=_SentinelPrimaryPoolSync, **to_primary
    )
    return client


RETRIES: Final = 3
"""How many times a command that met a broken connection is sent again, each time on a new connection."""
RETRY_BACKOFF: Final = ExponentialWithJitterBackoff(base=0.05, cap=0.5)
"""Waits between those tries: up to 0.1, 0.2, 0.4 s (full jitter), so a Redis that is really down is
answered as such (503) within about a second, and a restarted one is reached on the first or second try."""
HEALTH_CHECK_INTERVAL_S: Final = 30
"""A pooled connection idle longer than this is checked with a PING before it carries a command (a
connection a proxy or NAT closed while idle is replaced before, not after, a command is lost on it)."""


def resilience_options(*, asyncio: bool = True) -> dict[str, Any]:
    """The client options that make a broken connection cost a retry, not an error: redis-py's own retry
    and health-check machinery, configured (a pooled connection from before a Redis restart fails on first
    use; without a retry that failure was the request's answer).

    A command that fails with ``ConnectionError`` or ``TimeoutError`` (``BusyLoadingError``, a server still
    loading its data, is a ``ConnectionError``) is sent again on a fresh connection after a backoff, up to
    :data:`RETRIES` times. Sending again is safe for every command this project sends: appends carry
    explicit event ids (a repeated one is refused and reported), the claim script only takes a request
    that is still queued or fences a stale holder, a repeated enqueue of one request is skipped by the
    claim script, and the rest are reads or idempotent writes. Blocking reads (``XREAD``/``XREADGROUP``
    with ``BLOCK``) are retried only after a failure, never after a cancellation: redis-py disconnects a
    connection whose reply was not read (a cancelled blocking read), so it is never reused."""
    retry_class = redis.asyncio.retry.Retry if asyncio else redis.retry.Retry
    return {
        "retry": retry_class(RETRY_BACKOFF, RETRIES, supported_errors=UNREACHABLE),
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }


def connection_name(*parts: str) -> str:
    """A name for a process's Redis connections (``CLIENT SETNAME``), from its role and id: parts joined by
    ``:``, with what Redis refuses in a name (spaces, control characters) replaced by ``_``."""
    return ":".join("".join(c if "!" <= c <= "~" else "_" for c in part) for part in parts)


def connect(
    target: RedisTarget, *, name: str, max_connections: int, socket_timeout_s: float | None = 10.0
) -> AsyncRedis:
    """An asyncio client whose connections are named ``name`` (``CLIENT LIST`` shows which process holds
    which) and bounded: at most ``max_connections`` to the server (to each node of a cluster) however
    many commands are waiting, each waiting (up to the socket timeout) for a connection to come back
    rather than opening another or failing. Binary replies (payloads are msgpack); broken connections
    retried (:func:`resilience_options`).

    The bound is safe only for commands that answer at once: a command that blocks server-side (``XREAD
    BLOCK``, ``XREADGROUP BLOCK``) gets a client of its own, or it would hold a connection others wait for."""
    common: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": 5.0,
        "max_connections": max_connections,
        "client_name": name,
        **resilience_options(),
        **target.tls_kwargs(),
    }
    wait_s = socket_timeout_s or 10.0
    if target.cluster:
        return BoundedRedisCluster.from_url(target.plain_url, wait_s=wait_s, **common)
    if target.sentinel is not None:
        return sentinel_primary(target, target.sentinel, common, pool_timeout_s=wait_s)
    # A blocking pool: past max_connections a command waits for a connection to come back instead of
    # failing at once with "Too many connections" (500 clients starting together did).
    pool = aredis.BlockingConnectionPool.from_url(target.plain_url, timeout=wait_s, **common)
    pool.connection_class = tokenspool_connection(pool.connection_class)
    return aredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


class CommandSlots:
    """At most ``limit`` commands (or pipelines) of one client in flight; the others wait their turn, up to
    ``wait_s``. Re-entrant within a task: redis-py's cluster pipeline sends a redirected command again
    through its client while it runs, and that must not wait for a slot its own pipeline holds."""

    def __init__(self, limit: int, wait_s: float) -> None:
        self._free = asyncio.Semaphore(limit)
        self._wait_s = wait_s
        self._holding: contextvars.ContextVar[bool] = contextvars.ContextVar("holding_a_command_slot", default=False)

    @contextlib.asynccontextmanager
    async def taken(self) -> AsyncIterator[None]:
        if self._holding.get():
            yield
            return
        try:
            async with asyncio.timeout(self._wait_s):
                await self._free.acquire()
        except TimeoutError as exc:
            raise redis.exceptions.ConnectionError("No connection available.") from exc
        token = self._holding.set(True)
        try:
            yield
        finally:
            self._holding.reset(token)
            self._free.release()


class BoundedRedisCluster(aredis.RedisCluster):
    """A cluster client that waits for a connection past ``max_connections`` per node, as the one-server
    pool does. redis-py's cluster node refuses at once instead (``MaxConnectionsError``), so this client
    lets at most ``max_connections`` commands and pipelines be in flight: each holds at most one
    connection per node at a time (a pipeline's per-node parts release theirs before redirected commands
    are sent again), so no node's pool is ever asked for more."""

    def __init__(self, *, wait_s: float = 10.0, max_connections: int = 100, **kwargs: Any) -> None:
        super().__init__(max_connections=max_connections, **kwargs)
        self.command_slots = CommandSlots(max_connections, wait_s)
        # Nodes found later are made with the manager's options; the seeds exist already.
        nodes = self.nodes_manager
        nodes.connection_kwargs["connection_class"] = tokenspool_connection(nodes.connection_kwargs["connection_class"])
        for node in nodes.startup_nodes.values():
            node.connection_class = tokenspool_connection(node.connection_class)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.command_slots.taken():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise redis.exceptions.RedisClusterException("shard_hint is deprecated in cluster mode")
        return _BoundedClusterPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py builds its own


class _BoundedClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = self.cluster_client
        assert isinstance(client, BoundedRedisCluster)
        async with client.command_slots.taken():
            return await super().execute(raise_on_error, allow_redirections)


def connect_sync(target: RedisTarget, *, socket_timeout_s: float = 5.0) -> SyncRedis:
    """A blocking client, for the operator commands and tests (broken connections retried likewise)."""
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        **resilience_options(asyncio=False),
        **target.tls_kwargs(),
    }
    if target.cluster:
        return redis.RedisCluster.from_url(target.plain_url, **common)
    if target.sentinel is not None:
        return sentinel_primary_sync(target, target.sentinel, common)
    return redis.Redis.from_url(target.plain_url, **common)


def check_reachable(target: RedisTarget, *, timeout_s: float = 3.0) -> None:
    """Ping Redis once, synchronously; raise :class:`RedisUnreachableError` with a clear message."""
    try:
        client = connect_sync(target, socket_timeout_s=timeout_s)
    except ValueError as exc:
        raise RedisUnreachableError(f"invalid Redis URL {redact(target.url)!r}: {exc}") from exc
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:  # a cluster client reads the
        # slot map as it is built
        raise RedisUnreachableError(f"cannot reach Redis at {redact(target.url)}: {exc}") from exc
    try:
        client.ping()
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise RedisUnreachableError(f"cannot reach Redis at {redact(target.url)}: {exc}") from exc
    finally:
        client.close()


def _sentinel_node_options(where: SentinelURL) -> dict[str, Any]:
    """What :class:`NodeConnections` needs to log in to a Sentinel-managed node (its address comes later)."""
    options: dict[str, Any] = {"db": where.db, "username": where.username, "password": where.password}
    if where.tls:
        options["connection_class"] = SSLConnection
    return options


class NodeConnections:
    """Dedicated connections to the node that serves a given key: what a blocking reader needs, since a
    blocked connection must never go back to a shared pool, and ``CLIENT UNBLOCK`` must reach the same node
    as the connection it wakes. On one server every key is on the one node; on a cluster the node comes
    from the client's slot map, which :meth:`refresh` re-reads after a ``MOVED`` (resharding, failover).

    Each node gets one control connection (``CLIENT UNBLOCK`` answers at once; callers wait their turn for
    it), named ``<name>:control``; the blocking readers' own connections are named ``<name>:reader``."""

    def __init__(self, target: RedisTarget, client: AsyncRedis, *, name: str, socket_timeout_s: float) -> None:
        self._target = target
        self._client = client
        self._name = name
        where = target.sentinel
        self._options: dict[str, Any] = {
            **(parse_async_url(target.plain_url) if where is None else _sentinel_node_options(where)),
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": 5.0,
            **target.tls_kwargs(),
        }
        self._pools: dict[Address, BlockingConnectionPool] = {}
        self._controls: dict[Address, aredis.Redis] = {}

    @property
    def cluster(self) -> bool:
        return self._target.cluster

    async def address_for(self, key: str) -> Address:
        """The node that serves ``key`` now: the slot's owner on a cluster, the primary the sentinels name
        (asked anew each time: after a failover it is another node), or the one server."""
        if isinstance(self._client, aredis.RedisCluster):
            node = self._client.get_node_from_key(key)
            if node is None:
                raise redis.exceptions.ConnectionError(f"no cluster node serves the slot of {key!r} yet")
            return node.host, int(node.port)
        pool = self._client.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]
            return str(host), int(port)
        return str(self._options.get("host", "localhost")), int(self._options.get("port", 6379))

    async def refresh(self) -> None:
        """Re-read the cluster's slot map (no-op on one server)."""
        if isinstance(self._client, aredis.RedisCluster):
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self._client.nodes_manager.initialize()

    def _pool(self, address: Address) -> BlockingConnectionPool:
        pool = self._pools.get(address)
        if pool is None:
            options = dict(self._options)
            if self._target.cluster:
                options.pop("db", None)
            options["host"], options["port"] = address
            timeout = options["socket_timeout"]
            pool = BlockingConnectionPool(
                max_connections=1, timeout=timeout, client_name=f"{self._name}:control", **options
            )
            pool.connection_class = tokenspool_connection(pool.connection_class)
            self._pools[address] = pool
        return pool

    async def open(self, address: Address) -> AbstractConnection:
        """A new connection of its own (never pooled) to ``address``, connected."""
        pool = self._pool(address)
        conn = pool.connection_class(**{**pool.connection_kwargs, "client_name": f"{self._name}:reader"})
        await conn.connect()  # type: ignore[no-untyped-call]
        return conn

    def control(self, address: Address) -> aredis.Redis:
        """A pooled client for short commands (``CLIENT UNBLOCK``) to the node at ``address``."""
        client = self._controls.get(address)
        if client is None:
            client = aredis.Redis(connection_pool=self._pool(address))
            self._controls[address] = client
        return client

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()
        self._controls.clear()
