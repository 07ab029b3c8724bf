"""The worker's periodic jobs, each in a loop of its own.

One failing job (Redis unreachable, a bug) is logged and retried at its next period, and never delays or
skips the others: each job has its own loop, its own error handling and its own log line. Cancellation is
never swallowed: it ends the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.exceptions

from tokenspool.shared.aio import reraise_if_cancelling

log = logging.getLogger("tokenspool.worker")


@dataclass(frozen=True, slots=True)
class PeriodicJob:
    name: str
    """What the job does, for its log lines (e.g. "lease renewal")."""
    run: Callable[[], Awaitable[None]]


async def every(period_s: float, job: PeriodicJob) -> None:
    """Run ``job`` every ``period_s`` seconds until cancelled."""
    while True:
        await asyncio.sleep(period_s)
        try:
            await job.run()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            reraise_if_cancelling()
            log.warning("%s failed (retrying in %gs): %s", job.name, period_s, exc)
        except Exception:
            reraise_if_cancelling()
            log.exception("%s failed (retrying in %gs)", job.name, period_s)
