"""Sample values the in-process unit tests share: well-formed request ids and a request's metadata."""

from __future__ import annotations

from tokenspool.shared.store import RequestMeta

HEX32 = "0123456789abcdef" * 2


def request_id_with(first_hex: str, kind: str = "chat") -> str:
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return prefix + first_hex + HEX32[1:]


def meta(stream_format: str = "chat", include_usage: bool = False, request_id: str | None = None) -> RequestMeta:
    rid = request_id or request_id_with("c", "chat" if stream_format != "completion" else "completion")
    return RequestMeta(
        request_id=rid,
        state="running",
        kind="completion" if stream_format == "completion" else "chat",
        stream_format=stream_format,  # type: ignore[arg-type]
        model="tokenspool-sim",
        owner="anon",
        include_usage=include_usage,
        created_s=1_700_000_000,
        enqueued_ms=1,
        started_ms=2,
        finished_ms=0,
        worker="w",
        attempt=1,
        last_seq=3,
        finish_reason="",
        prompt_tokens=0,
        completion_tokens=0,
        error="",
        cancel_requested=False,
    )
