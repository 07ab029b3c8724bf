"""The worker handover marker: one definition (shared/handover.py) that the gateway renders, the Python
client and the browser page recognise, and that clients ignoring comments never see."""

from __future__ import annotations

import re
from pathlib import Path

from tokenspool.client_core import SSEComment, SSEDecoder, StreamState
from tokenspool.gateway.chunks import ChunkRenderer
from tokenspool.shared import handover, keys, wire
from tokenspool.shared.store import RequestMeta

CHAT_JS = Path(__file__).resolve().parent.parent / "gateway" / "static" / "chat.js"


def rendered_stream(events: list[wire.Event]) -> tuple[str, bytes]:
    request_id = keys.new_request_id("chat")
    meta = RequestMeta.from_hash(request_id, {b"state": b"running", b"format": b"chat", b"model": b"m"})
    renderer = ChunkRenderer(meta)
    return request_id, renderer.frames([(seq, wire.encode(e)) for seq, e in enumerate(events, 1)])


def test_a_stored_handover_is_rendered_as_a_comment_that_names_its_sequence_number() -> None:
    stored = handover.event("w2", after_seq=1, attempt=2)
    _request_id, frames = rendered_stream([wire.Event("delta", "a", (1,)), stored, wire.Event("delta", "b", (2,))])
    comments = [line[1:].strip() for line in frames.decode().splitlines() if line.startswith(":")]
    assert len(comments) == 1 and comments[0].startswith(handover.HANDOVER_COMMENT_KEYWORD + " ")
    notice = handover.parse_comment(comments[0])
    assert notice == handover.HandoverNotice(2, "continued by worker w2 after event 1 (attempt 2)")
    data_lines = [line for line in frames.decode().splitlines() if line.startswith(("data:", "id:"))]
    assert not any("handover" in line for line in data_lines), "a client that ignores comments sees no trace of it"


def test_the_python_client_allows_exactly_the_sequence_number_a_handover_takes() -> None:
    request_id, frames = rendered_stream(
        [wire.Event("delta", "a", (1,)), handover.event("w2", 1, 2), wire.Event("delta", "b", (2,))]
    )
    state = StreamState(request_id)
    items = SSEDecoder().feed(frames)
    assert sum(isinstance(item, SSEComment) for item in items) == 1
    texts = [getattr(state.handle(item), "text", None) for item in items]
    assert [t for t in texts if t is not None] == ["a", "b"] and state.last_seq == 3


def test_other_comments_are_not_handovers() -> None:
    for text in ("queued: 3 ahead", "continued by worker w2 after event 1 (attempt 2)", "handovers", "", "keepalive"):
        assert handover.parse_comment(text) is None, text
    assert handover.parse_comment("handover") == handover.HandoverNotice(0)
    assert handover.parse_comment("handover {not json") == handover.HandoverNotice(0)


def test_the_browser_page_uses_the_same_keyword_as_the_python_constant() -> None:
    match = re.search(r"^const HANDOVER_COMMENT_KEYWORD = '([^']*)';", CHAT_JS.read_text(), re.MULTILINE)
    assert match is not None, "chat.js must define HANDOVER_COMMENT_KEYWORD"
    assert match.group(1) == handover.HANDOVER_COMMENT_KEYWORD
