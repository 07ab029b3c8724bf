"""The SSE encoder (gateway/sse.py), checked with a parser that follows the WHATWG event-stream rules."""

from __future__ import annotations

import orjson
import pytest

from tests.samples import HEX32
from tests.sse_spec import frame_events, parse_sse
from tokenspool.gateway.sse import DONE_FRAME, comment_frame, data_frame, event_frame


def test_the_test_parser_follows_the_spec_examples() -> None:
    events, comments = parse_sse(b": hi\r\ndata: YHOO\rdata: +2\ndata\n\nid: 7\ndata:x\n\ndata: dropped")
    assert comments == [" hi"]
    assert [(e.data, e.last_event_id) for e in events] == [("YHOO\n+2\n", ""), ("x", "7")]


ODD_TEXTS = [
    "plain",
    "",
    " leading space",
    "trailing space ",
    "emoji 👋🏽 family 👨‍👩‍👧 flag 🇳🇴",
    "RTL: مرحبا بالعالم \u202eevil\u202c שלום",
    "line\u2028separator and paragraph\u2029separator",
    "next line \u0085 and vertical tab \x0b form feed \x0c file sep \x1c",
    "tabs\tand\tspaces",
    "data: not a field",
    "id: nor this",
    ": nor a comment",
    "zero width \u200b joiner \u200d bom \ufeff",
    "high plane \U0001d518\U0001d52b\U0001d526 and \U0002070e",
]


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        (b"one", [b"one"]),
        (b"a\nb", [b"a", b"b"]),
        (b"a\r\nb", [b"a", b"b"]),
        (b"a\rb", [b"a", b"b"]),
        (b"a\r\n\r\nb\n\rc\r\rd", [b"a", b"", b"b", b"", b"c", b"", b"d"]),
        (b"\n", [b"", b""]),
        (b"end\n", [b"end", b""]),
    ],
)
def test_event_frame_writes_one_data_line_per_line(data: bytes, lines: list[bytes]) -> None:
    frame = event_frame("id-1", data)
    assert frame.endswith(b"\n\n")
    body = frame[:-1]  # without the blank line that ends the event
    assert b"\r" not in frame
    out = body.split(b"\n")[:-1]
    assert out[0] == b"id: id-1"
    assert out[1:] == [b"data: " + line for line in lines]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_event_frame_data_and_id_survive_a_spec_parser(text: str) -> None:
    event_id = "chatcmpl-" + HEX32 + ":7 " + text
    frame = event_frame(event_id, text.encode())
    events = frame_events(frame)
    assert len(events) == 1
    assert events[0].data == text
    assert events[0].last_event_id == event_id


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("text", ODD_TEXTS[:8])
def test_event_frame_multiline_data_survives_a_spec_parser(text: str, sep: str) -> None:
    data = f"{text}{sep}second{sep}{sep}{text}"
    events = frame_events(event_frame("x", data.encode()))
    assert len(events) == 1
    assert events[0].data == data.replace(sep, "\n")


@pytest.mark.parametrize("bad_id", ["a\nb", "a\r\nb", "a\rb", "a\0b", "\n\ndata: injected\n\nid: evil", "x\r"])
def test_event_frame_sanitises_ids(bad_id: str) -> None:
    frame = event_frame(bad_id, b"payload")
    assert frame.count(b"\n") == 3  # id line, data line, blank line
    events = frame_events(frame)
    assert len(events) == 1
    assert events[0].data == "payload"
    cleaned = bad_id.replace("\r", "").replace("\n", "").replace("\0", "")
    assert events[0].last_event_id == cleaned


def test_event_frames_concatenate_into_a_stream() -> None:
    stream = b"".join(event_frame(f"r:{i}", f"chunk {i}\nline".encode()) for i in range(1, 4)) + DONE_FRAME
    events, _ = parse_sse(stream)
    assert [(e.last_event_id, e.data) for e in events] == [
        ("r:1", "chunk 1\nline"),
        ("r:2", "chunk 2\nline"),
        ("r:3", "chunk 3\nline"),
        ("r:3", "[DONE]"),  # [DONE] carries no id: the last id stays the resume point
    ]


@pytest.mark.parametrize(
    "text", ["waiting", "a\nb", "a\r\nb", "a\rb", "\n", "\r\n\r\n", "queued: 3 ahead\n\ndata: x", "👋 \u2028"]
)
def test_comment_frame_is_one_line(text: str) -> None:
    frame = comment_frame(text)
    assert frame.startswith(b":")
    assert frame.endswith(b"\n\n")
    inner = frame[:-2]
    assert b"\n" not in inner
    assert b"\r" not in inner
    events, comments = parse_sse(frame)
    assert events == []
    assert len(comments) == 1


@pytest.mark.parametrize(
    "data",
    [
        b'{"error": {"message": "ok"}}',
        b'{"error":\n{"message": "x"}}',
        b'{"error":\r\n{"message": "x"}}',
        b'{"error":\r{"message": "x"}}',
    ],
    ids=["single-line", "lf", "crlf", "cr"],
)
def test_data_frame_is_one_event_whatever_the_line_breaks(data: bytes) -> None:
    events = frame_events(data_frame(data))
    assert len(events) == 1
    assert orjson.loads(events[0].data) == orjson.loads(data)
    assert events[0].last_event_id == ""


def test_done_frame_is_the_openai_terminator() -> None:
    events = frame_events(DONE_FRAME)
    assert [e.data for e in events] == ["[DONE]"]
