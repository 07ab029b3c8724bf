"""The worker handover marker: how a stream says "another worker continues this request from here".

A worker that takes over a request stores a ``handover`` event (:func:`event`) before its first token.
The event has a sequence number of its own but is not a token: SSE shows it only as a comment,

    : handover {"seq": 7, "message": "continued by worker w2 after event 6 (attempt 2)"}

so clients that ignore comments (every OpenAI client) read an unbroken stream, and a client that checks
continuity knows that the next event id skips exactly ``seq``. The comment is the keyword
:data:`HANDOVER_COMMENT_KEYWORD`, a space and a JSON object; ``seq`` is always there, ``message`` is for
people, and a reader ignores fields it does not know. The browser page (``gateway/static/chat.js``) keeps
the keyword as a literal of its own (a test checks it against this one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import orjson

from tokenspool.shared import wire

HANDOVER_COMMENT_KEYWORD: Final = "handover"
"""The first word of a handover's SSE comment."""


@dataclass(frozen=True, slots=True)
class HandoverNotice:
    """A handover as a client reads it from the stream."""

    seq: int
    """The sequence number the handover event took: the next event id skips it."""
    message: str = ""


def event(worker_id: str, after_seq: int, attempt: int) -> wire.Event:
    """The event a worker stores when it continues a request after event ``after_seq``."""
    return wire.Event(
        "handover", message=f"continued by worker {worker_id} after event {after_seq} (attempt {attempt})"
    )


def comment(seq: int, stored: wire.Event) -> str:
    """The SSE comment text (without the leading ``:``) that shows the stored handover event ``seq``."""
    body = orjson.dumps({"seq": seq, "message": stored.message}).decode()
    return f"{HANDOVER_COMMENT_KEYWORD} {body}"


def parse_comment(text: str) -> HandoverNotice | None:
    """The handover an SSE comment announces, or None when the comment is something else (a heartbeat, a
    queue notice). A handover comment whose JSON a client cannot read still counts as a handover: the
    keyword alone says one sequence number is skipped."""
    keyword, _, rest = text.strip().partition(" ")
    if keyword != HANDOVER_COMMENT_KEYWORD:
        return None
    try:
        body = orjson.loads(rest) if rest else {}
    except orjson.JSONDecodeError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    seq = body.get("seq")
    message = body.get("message")
    return HandoverNotice(
        seq if isinstance(seq, int) and not isinstance(seq, bool) else 0,
        message if isinstance(message, str) else "",
    )
