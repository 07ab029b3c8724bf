"""Operator commands to one worker (``tokenspool drain`` / ``rebalance`` write them in the registry):
``drain`` (finish what runs, then exit), ``migrate`` (hand everything to other workers, then exit) and
``shed N`` (hand N running requests to other workers and go on)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tokenspool.shared import registry
from tokenspool.shared.redis_client import AsyncRedis

log = logging.getLogger("tokenspool.worker")


@dataclass(frozen=True, slots=True)
class OperatorCommands:
    """Takes this worker's waiting command (at most one per poll) and carries it out."""

    client: AsyncRedis
    worker_id: str
    drain: Callable[[bool], None]
    """Stop taking requests and exit once drained; True: migrate the running ones first."""
    shed: Callable[[int], Awaitable[int]]
    """Hand this many running requests to other workers."""

    async def poll(self) -> None:
        command = await registry.take_command(self.client, self.worker_id)
        if command:
            await self.obey(command)

    async def obey(self, command: str) -> None:
        verb, _, argument = command.partition(" ")
        log.warning("operator command: %s", command)
        if verb in ("drain", "migrate"):
            self.drain(verb == "migrate")
        elif verb == "shed" and argument.isdigit():
            await self.shed(int(argument))
        else:
            log.error("unknown operator command %r", command)
