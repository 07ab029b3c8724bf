"""Redis URLs (shared/redis_client.py): the scheme picks cluster mode, Sentinel and TLS; a Sentinel URL is parsed
strictly; errors hide the password; commands are packed in C."""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path

import pytest
import redis.asyncio as aredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection, Connection

from tokenspool.redis_server import EmbeddedCluster, EmbeddedRedis
from tokenspool.shared.redis_client import RedisTarget, TokenspoolConnection, connect
from tokenspool.shared.settings import SentinelURL, parse_sentinel_url


@pytest.mark.parametrize(
    ("url", "cluster", "tls"),
    [
        ("redis://127.0.0.1:6379/0", False, False),
        ("rediss://gw:secret@redis.internal:6380/0", False, True),
        ("redis+cluster://10.0.0.1:7000", True, False),
        ("rediss+cluster://gw:secret@10.0.0.1:7000", True, True),
    ],
)
def test_redis_url_scheme_selects_cluster_mode_and_tls(url: str, cluster: bool, tls: bool) -> None:
    target = RedisTarget(url)
    assert (target.cluster, target.tls) == (cluster, tls)
    assert "+cluster" not in target.plain_url and target.plain_url.split("://")[1] == url.split("://")[1]


def test_redis_target_never_shows_the_password_in_its_errors() -> None:
    with pytest.raises(ValueError) as raised:
        RedisTarget("redis+sentinel://gw:hunter2@h:1")
    assert "hunter2" not in str(raised.value) and "gw:***@h:1" in str(raised.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380,sentinel-c/mymaster",
            SentinelURL((("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-c", 26379)), "mymaster"),
        ),
        (
            "rediss+sentinel://gw:p%40ss@[::1]:5000/cache.main/3",
            SentinelURL((("::1", 5000),), "cache.main", 3, "gw", "p@ss", tls=True),
        ),
        ("redis+sentinel://:secret@s1/m/", SentinelURL((("s1", 26379),), "m", 0, None, "secret")),
    ],
)
def test_sentinel_url_names_every_sentinel_the_service_the_db_and_the_login(url: str, expected: SentinelURL) -> None:
    target = RedisTarget(url)
    assert target.sentinel == expected
    assert not target.cluster and target.tls == expected.tls


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379", "service name"),
        ("redis+sentinel://s1:26379/", "service name"),
        ("redis+sentinel:///m", "bad sentinel address ''"),
        ("redis+sentinel://s1,,s2/m", "bad sentinel address ''"),
        ("redis+sentinel://s1:0/m", "port 1-65535"),
        ("redis+sentinel://s1:99999/m", "port 1-65535"),
        ("redis+sentinel://s1:x/m", "bad sentinel address 's1:x'"),
        ("redis+sentinel://s1/m/one", "bad database 'one'"),
        ("redis+sentinel://s1/m/0/extra", "bad database '0/extra'"),
        ("redis+sentinel://s1/m?db=1", "no query"),
        ("redis+sentinel://s1,s1/m", "same sentinel twice"),
        ("redis+sentinel://gw@s1/m", "user without a password"),
    ],
)
def test_sentinel_url_is_refused_with_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RedisTarget(url)
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_sentinel_url(url)


def test_sentinel_url_errors_never_show_the_password() -> None:
    with pytest.raises(ValueError) as raised:
        RedisTarget("redis+sentinel://gw:hunter2@s1:1")
    assert "hunter2" not in str(raised.value)


def test_commands_are_packed_in_c_byte_for_byte_as_redis_py_packs_them(
    redis_server: EmbeddedRedis | EmbeddedCluster,
) -> None:
    """Every client :func:`connect` builds packs with hiredis, and the bytes are redis-py's own for what this
    project sends (text, bytes, ints, floats); what hiredis does not take still goes through redis-py: a
    two-word command name, and the values redis-py refuses."""

    async def scenario() -> None:
        client = connect(RedisTarget(redis_server.url), name="test", max_connections=2)
        try:
            await client.set("ts:test:packed", "é" * 3)  # a cluster client learns its nodes here
            assert await client.get("ts:test:packed") == "é".encode() * 3
            if isinstance(client, aredis.RedisCluster):
                classes: list[type[AbstractConnection]] = [node.connection_class for node in client.get_nodes()]
            else:
                classes = [client.connection_pool.connection_class]
            assert classes and all(issubclass(c, TokenspoolConnection) for c in classes), classes
            connection_class = classes[0]
            packed = connection_class()
            plain = Connection()
            for args in (
                ("EVALSHA", "0" * 40, 2, "ts:{p1}:r:x:meta", b"ts:{p1}:r:x:ev", 17, -3, 2.5, "é", b"\x00\xff"),
                ("XREAD", "COUNT", 256, "BLOCK", 5000, "STREAMS", b"k", "0-0"),
                ("CLIENT UNBLOCK", 12),
            ):
                assert b"".join(packed.pack_command(*args)) == b"".join(plain.pack_command(*args)), args
            for refused in (None, True):
                with pytest.raises(redis.exceptions.DataError):
                    packed.pack_command("SET", "k", refused)  # type: ignore[arg-type]
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_command_send_never_loses_its_callers_cancellation(tmp_path: Path) -> None:
    """A task cancelled at any point of a send stops there. redis-py's own send (``asyncio.wait_for`` on
    Python 3.11) returned normally when the cancellation arrived as its send task finished, and the caller went
    on to read the reply: a relay reader then kept reading, and a closing gateway waited on it for ever. Every
    interleaving of the cancel with the send's first turns of the loop is tried."""

    async def scenario(url: str) -> None:
        client = connect(RedisTarget(url), name="test", max_connections=2)
        try:
            for turns in range(6):
                conn = await client.connection_pool.get_connection()
                read_the_reply = False

                async def ping(conn: AbstractConnection = conn) -> None:
                    nonlocal read_the_reply
                    await conn.send_command("PING")
                    await conn.read_response()
                    read_the_reply = True

                task = asyncio.create_task(ping())
                for _ in range(turns):
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                assert not (read_the_reply and task.cancelling()), f"cancellation lost after {turns} turns"
                await conn.disconnect()
                await client.connection_pool.release(conn)
        finally:
            await client.aclose()

    with EmbeddedRedis(data_dir=tmp_path) as server:
        asyncio.run(scenario(server.url))
