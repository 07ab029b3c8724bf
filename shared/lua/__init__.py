"""Every Lua script tokenspool runs in Redis, one ``.lua`` file per atomic operation, loaded here only.

Each file says what its ``KEYS`` and ``ARGV`` are and what it returns. The files are package data
(``[tool.setuptools.package-data]`` in pyproject.toml), read when a component builds the object that runs
them, never at import.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Any, Final, Literal

from redis.commands.core import AsyncScript

from tokenspool.shared.redis_client import AsyncRedis

ScriptName = Literal[
    "create", "append", "claim", "cancel", "renew_leases", "claim_abandoned", "count_request", "open_stream"
]
SCRIPT_NAMES: Final[tuple[ScriptName, ...]] = (
    "create",
    "append",
    "claim",
    "cancel",
    "renew_leases",
    "claim_abandoned",
    "count_request",
    "open_stream",
)
"""One per file in this package: ``<name>.lua``."""


def source(name: ScriptName) -> str:
    """The text of one script."""
    return resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def register(client: AsyncRedis, name: ScriptName) -> AsyncScript:
    """A script bound to ``client``: called by hash, loaded into the server when it answers NOSCRIPT."""
    return client.register_script(source(name))


async def load(client: AsyncRedis, scripts: Iterable[AsyncScript]) -> None:
    """Load scripts into the server (every primary of a cluster): after a restart, a failover or a new
    node, pipelined EVALSHAs answer NOSCRIPT until this ran."""
    redis_any: Any = client
    for script in scripts:
        await redis_any.script_load(script.script)
