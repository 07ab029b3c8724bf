"""Logging set-up, once per process: plain lines for people or JSON lines for collectors.

A line about one request passes ``extra=about(request_id)``: plain lines already name the id in their
text, and JSON lines carry it as a ``request_id`` field a collector can index. Prompts and generated text
are users' data: they are logged only when ``log_content`` is set, and then only through :func:`content`.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Final

import orjson

from tokenspool.shared.settings import CommonSettings

_CREDENTIALS: Final = (
    re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)[^\r\n\"']+"),
    re.compile(r"(?i)(bearer\s+)[^\s\"',;]+"),
    re.compile(r"(tokenspool\.bearer\.)[A-Za-z0-9_=-]+"),
)


class RedactCredentials(logging.Filter):
    """Replaces credentials in every line, whoever logs it: libraries log request headers at debug level
    (the WebSocket server logs its handshake), and API keys ride in ``Authorization`` headers and, from
    browsers, in the WebSocket subprotocol offer."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for pattern in _CREDENTIALS:
            redacted = pattern.sub(lambda m: m.group(1) + "[redacted]", redacted)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            body["request_id"] = request_id
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(body).decode()


def configure(settings: CommonSettings, process: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {process} %(name)s: %(message)s"))
    handler.addFilter(RedactCredentials())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


def about(request_id: str) -> Mapping[str, str]:
    """The ``extra`` of a log line about one request."""
    return {"request_id": request_id}


def content(text: str, limit: int = 2000) -> str:
    """Users' text for a debug log line (only where ``log_content`` is set), bounded and on one line."""
    clipped = text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"
    return repr(clipped)
