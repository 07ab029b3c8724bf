"""A spec-following SSE parser (https://html.spec.whatwg.org/multipage/server-sent-events.html).

The unit tests check the gateway's SSE encoder and rendered chunks against it: an independent reading of
the WHATWG event-stream rules, not the project's own client decoder.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass
class ParsedEvent:
    data: str
    last_event_id: str
    type: str


def parse_sse(stream: bytes) -> tuple[list[ParsedEvent], list[str]]:
    """Events and comments of a complete stream, as an ``EventSource`` would see them."""
    text = stream.decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = re.split(r"\r\n|\r|\n", text)
    lines.pop()  # whatever follows the last line terminator is an incomplete line: discarded
    events: list[ParsedEvent] = []
    comments: list[str] = []
    data = ""
    event_type = ""
    id_buffer = ""
    last_event_id = ""
    for line in lines:
        if line == "":
            last_event_id = id_buffer
            if data == "":
                event_type = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            events.append(ParsedEvent(data, last_event_id, event_type or "message"))
            data = ""
            event_type = ""
            continue
        if line.startswith(":"):
            comments.append(line[1:])
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data += value + "\n"
        elif name == "id":
            if "\0" not in value:
                id_buffer = value
        elif name == "event":
            event_type = value
        # retry and unknown fields: ignored here
    return events, comments


def frame_events(frame: bytes) -> list[ParsedEvent]:
    events, comments = parse_sse(frame)
    assert comments == []
    return events
