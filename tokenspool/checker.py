"""Classifying what a client received against what Redis stored, in the manner of RabbitMQ's Jepsen
checker: every request is ``ok``, or ``lost``, ``duplicated`` or ``out_of_order`` (first problem found)."""

from __future__ import annotations

from typing import Literal

from tokenspool.shared import keys, wire

Verdict = Literal["ok", "lost", "duplicated", "out_of_order"]


def classify(request_id: str, received_ids: list[str], stored: list[wire.Event], max_tokens: int | None) -> Verdict:
    """``received_ids``: the SSE ids the client got, in order. ``stored``: the request's events in Redis.
    ``max_tokens``: when set, the reply must hold exactly that many tokens (nothing cut short)."""
    seqs = []
    for event_id in received_ids:
        owner, seq = keys.parse_event_id(event_id)
        if owner != request_id:
            return "out_of_order"
        seqs.append(seq)
    if len(set(seqs)) != len(seqs):
        return "duplicated"
    if seqs != sorted(seqs):
        return "out_of_order"
    shown = {n for n, event in enumerate(stored, 1) if event.kind in ("delta", "error")}
    if shown - set(seqs):
        return "lost"
    if max_tokens is not None and sum(len(e.token_ids) for e in stored if e.kind == "delta") != max_tokens:
        return "lost"
    if not stored or stored[-1].kind != "end":
        return "lost"
    return "ok"
