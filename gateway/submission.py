"""Accepting a generation request: check it against what live workers serve and the queue's depth,
map retries with an Idempotency-Key onto the request they first created, and enqueue it.

A request that is refused leaves nothing in Redis: every check runs before the first write.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.catalog import ModelCatalog, ModelEntry
from gateway.errors import APIError, not_found
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from shared import keys, wire
from shared.logs import about
from shared.settings import GatewaySettings
from shared.store import RequestMeta, RequestStore, StreamFormat, now_ms

MAX_IDEMPOTENCY_KEY = 255

log = logging.getLogger("tokenspool.gateway.submission")


@dataclass(frozen=True, slots=True)
class Submitted:
    request_id: str
    created: bool
    """False when an Idempotency-Key mapped this submission onto an earlier request."""
    meta: RequestMeta | None = None
    """What was stored for a request created now (None for an earlier one: read it from Redis)."""


class SubmissionService:
    def __init__(self, store: RequestStore, catalog: ModelCatalog, settings: GatewaySettings) -> None:
        self.store = store
        self.catalog = catalog
        self.settings = settings

    async def submit(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        *,
        stream_format: StreamFormat,
        owner: str,
        idempotency_key: str | None,
    ) -> Submitted:
        models = await self.catalog.models()
        if body.model not in models:
            known = ", ".join(sorted(models)) or "none: no worker is registered"
            raise not_found(
                f"the model {body.model!r} does not exist or no worker serves it (served: {known})",
                code="model_not_found",
            )
        self._check_against_model(body, models[body.model])
        idem_key: str | None = None
        fingerprint = self._fingerprint(body)
        if idempotency_key is not None:
            if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
                raise APIError(
                    400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters", param="Idempotency-Key"
                )
            idem_key = keys.idempotency_key(owner, idempotency_key)
            earlier = await self._earlier(idem_key, fingerprint)
            if earlier is not None:
                return Submitted(earlier, created=False)
        waiting = await self.store.queue_waiting(body.model)
        if waiting >= self.settings.max_queue_depth:
            raise APIError(
                429,
                f"the queue for model {body.model!r} is full ({waiting} waiting); retry later",
                error_type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        kind: keys.RequestKind = "chat" if isinstance(body, ChatCompletionRequest) else "completion"
        request_id = keys.new_request_id(kind)
        if idem_key is not None:
            ttl_ms = int((self.settings.retention_s + self.settings.request_ttl_s) * 1000)
            won = await self.store.redis.set(idem_key, f"{request_id} {fingerprint}", nx=True, px=ttl_ms)
            if not won:
                earlier = await self._earlier(idem_key, fingerprint)
                if earlier is not None:
                    return Submitted(earlier, created=False)
        job = wire.Job(
            request_id=request_id,
            kind=kind,
            model=body.model,
            prompt=body.prompt_text() if isinstance(body, CompletionRequest) else "",
            messages=tuple(wire.ChatMessage(m.role, m.text()) for m in body.messages)
            if isinstance(body, ChatCompletionRequest)
            else (),
            sampling=wire.SamplingOptions(
                max_tokens=self._max_tokens(body),
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                stop=body.stop_sequences(),
                top_k=body.top_k,
                min_p=body.min_p,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                ignore_eos=body.ignore_eos,
                stop_token_ids=tuple(body.stop_token_ids or ()),
                logprobs=body.logprobs_top(),
            ),
            created_s=int(time.time()),
            enqueued_ms=now_ms(),
            background=body.background,
        )
        try:
            meta = await self.store.create(
                job, stream_format=stream_format, owner=owner, include_usage=body.include_usage
            )
        except BaseException:
            if idem_key is not None:
                await self.store.redis.delete(idem_key)
            raise
        log.info(
            "request %s accepted: model %s, %s, %s, max_tokens %s",
            request_id,
            body.model,
            kind,
            stream_format,
            job.sampling.max_tokens,
            extra=about(request_id),
        )
        return Submitted(request_id, created=True, meta=meta)

    def _check_against_model(self, body: ChatCompletionRequest | CompletionRequest, model: ModelEntry) -> None:
        """Refuse what the model's workers cannot do, before anything is stored."""
        if body.wants_logprobs() and "logprobs" in model.unsupported:
            raise APIError(
                400,
                f"logprobs are not supported by model {body.model!r}",
                param="logprobs",
                code="unsupported_parameter",
            )
        max_tokens = self._max_tokens(body)
        if model.max_model_len and max_tokens is not None and max_tokens >= model.max_model_len:
            raise APIError(
                400,
                f"max_tokens {max_tokens} does not fit model {body.model!r}, whose context is "
                f"{model.max_model_len} tokens including the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )

    @staticmethod
    def _max_tokens(body: ChatCompletionRequest | CompletionRequest) -> int | None:
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            return body.max_completion_tokens
        return body.max_tokens

    @staticmethod
    def _fingerprint(body: ChatCompletionRequest | CompletionRequest) -> str:
        canonical: Any = body.model_dump(mode="json")
        return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]

    async def _earlier(self, idem_key: str, fingerprint: str) -> str | None:
        raw: bytes | None = await self.store.redis.get(idem_key)  # type: ignore[assignment]
        if raw is None:
            return None
        request_id, _, earlier_fingerprint = raw.decode().partition(" ")
        if earlier_fingerprint != fingerprint:
            raise APIError(
                422,
                "this Idempotency-Key was used with a different request body",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        return request_id
