"""When a running request must stop before its engine finishes it: a client asked (the cancel flag), no
client stayed attached (unless it runs in the background), or it passed its deadline. Each policy asks the
request's write side to stop with the ending it gets; the request's task does the rest."""

from __future__ import annotations

import logging

from tokenspool.shared.logs import about
from tokenspool.shared.store import RequestStore, now_ms
from tokenspool.worker.outbox import Ending
from tokenspool.worker.running import RunningRequests
from tokenspool.worker.settings import WorkerSettings

log = logging.getLogger("tokenspool.worker")


async def stop_cancelled(running: RunningRequests, store: RequestStore) -> None:
    """Stop requests whose cancel flag a client set. A request that emits picks the flag up from its next
    append; this catches those that emit nothing yet (a long prompt, a stalled engine)."""
    writable = running.writable()
    for request_id, flagged in (await store.cancel_flags(list(writable))).items():
        if flagged:
            writable[request_id].request_stop(Ending.cancelled())


async def stop_unattended(running: RunningRequests, store: RequestStore, settings: WorkerSettings) -> None:
    """Stop requests whose clients all left more than the grace period ago (zombie generation), unless
    they were created to run in the background."""
    foreground = {r.job.request_id for r in running if not r.job.background}
    candidates = {rid: entry for rid, entry in running.writable().items() if rid in foreground}
    for request_id in await store.unattended(list(candidates), now_ms()):
        log.info("request %s: no client attached for %.0fs; cancelling it", request_id, settings.disconnect_grace_s)
        candidates[request_id].request_stop(
            Ending.cancelled(f"cancelled: no client was attached for {settings.disconnect_grace_s:g}s")
        )


def stop_overdue(running: RunningRequests, settings: WorkerSettings) -> None:
    """Stop requests still running ``request_deadline_s`` after they were submitted."""
    deadline_ms = settings.request_deadline_s * 1000
    now = now_ms()
    for held in running:
        if held.log is not None and now - held.job.enqueued_ms > deadline_ms:
            request_id = held.job.request_id
            log.info("request %s passed its deadline", request_id, extra=about(request_id))
            held.log.request_stop(
                Ending.failed(
                    "deadline_exceeded",
                    f"deadline exceeded: still running {settings.request_deadline_s:g}s after it was submitted",
                )
            )
