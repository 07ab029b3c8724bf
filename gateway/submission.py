"""Accepting a generation request: check its size and its key's limits, check it against what live
workers serve and the queue's depth, map retries with an Idempotency-Key onto the request they first
created, and enqueue it owned by its caller's key. Also the owner-checked status and cancel of a request.

A request that is refused leaves nothing in Redis: every check runs before the first write (the only
write before it is the key's per-minute counter, which counts the request being admitted).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from tokenspool.gateway.auth import Principal
from tokenspool.gateway.catalog import ModelCatalog, ModelEntry
from tokenspool.gateway.errors import APIError, bad_request, invalid_text, no_tokens, not_found, rate_limited
from tokenspool.gateway.limits import KeyLimits
from tokenspool.gateway.schemas import ChatCompletionRequest, CompletionRequest
from tokenspool.gateway.settings import GatewaySettings
from tokenspool.shared import keys, wire
from tokenspool.shared.logs import about
from tokenspool.shared.store import RequestMeta, RequestStore, StreamFormat, now_ms

MAX_IDEMPOTENCY_KEY = 255

log = logging.getLogger("tokenspool.gateway.submission")


@dataclass(frozen=True, slots=True)
class Submitted:
    request_id: str
    created: bool
    """False when an Idempotency-Key mapped this submission onto an earlier request."""
    meta: RequestMeta | None = None
    """What was stored for a request created now (None for an earlier one: read it from Redis)."""


class QueueDepth:
    """How many requests of each model wait, for the queue limit: read from Redis on most submissions only
    when the queue is getting full.

    Reading the depth (``XLEN`` + ``XPENDING``) costs a round trip on every request's path to its first
    token, and nearly always finds the queue far from full. A reading therefore stays good for ``fresh_s``
    (``TOKENSPOOL_QUEUE_DEPTH_FRESH_MS``)
    as long as it, plus the requests this gateway admitted since, stays under half the limit; from there on
    every submission reads it. Gateways do not share their counts, so a burst through several gateways can
    pass the limit by up to half of it per gateway before a reading sees it: the limit is backpressure, not
    an exact quota.
    """

    def __init__(self, store: RequestStore, *, limit: int, fresh_s: float) -> None:
        self._store = store
        self._half = limit / 2
        self._fresh_s = fresh_s
        self._readings: dict[str, tuple[float, int]] = {}  # model -> (when read, waiting then)
        self._admitted: dict[str, int] = {}  # model -> admitted since that reading

    async def waiting(self, model: str) -> int:
        """The model's waiting requests (an estimate while far from the limit), counting this one as admitted."""
        now = time.monotonic()
        read_at, waiting = self._readings.get(model, (float("-inf"), 0))
        estimate = waiting + self._admitted.get(model, 0)
        if now - read_at > self._fresh_s or estimate >= self._half:
            estimate = await self._store.queue_waiting(model)
            self._readings[model] = (now, estimate)
            self._admitted[model] = 0
            if len(self._readings) > 10_000:  # models come and go; never let this grow without bound
                self._readings = {model: self._readings[model]}
                self._admitted = {model: 0}
        self._admitted[model] = self._admitted.get(model, 0) + 1
        return estimate


class SubmissionService:
    def __init__(
        self, store: RequestStore, catalog: ModelCatalog, limits: KeyLimits, settings: GatewaySettings
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.limits = limits
        self.settings = settings
        self.queue_depth = QueueDepth(
            store, limit=settings.max_queue_depth, fresh_s=settings.queue_depth_fresh_ms / 1000
        )

    async def submit(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        *,
        stream_format: StreamFormat,
        caller: Principal,
        idempotency_key: str | None,
    ) -> Submitted:
        """Record and enqueue a request that passed :meth:`check`."""
        owner = caller.owner
        models = await self.catalog.models()
        if body.model not in models:
            known = ", ".join(sorted(models)) or "none: no worker is registered"
            raise not_found(
                f"the model {body.model!r} does not exist or no worker serves it (served: {known})",
                code="model_not_found",
            )
        self._check_against_model(body, models[body.model])
        idem_key: str | None = None
        fingerprint = ""
        if idempotency_key is not None:
            fingerprint = self._fingerprint(body)
            idem_key = self._idempotency_record(owner, idempotency_key)
            earlier = await self._earlier(idem_key, fingerprint)
            if earlier is not None:
                return Submitted(earlier, created=False)
        waiting = await self.queue_depth.waiting(body.model)
        if waiting >= self.settings.max_queue_depth:
            raise rate_limited(
                f"the queue for model {body.model!r} is full ({waiting} waiting); retry later", code="queue_full"
            )
        await self.limits.admit_request(caller)
        kind: Literal["chat", "completion"] = "chat" if isinstance(body, ChatCompletionRequest) else "completion"
        request_id = keys.new_request_id("response" if stream_format == "response" else kind)
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
                max_tokens=self._max_tokens(body, models[body.model]),
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
            body=orjson.dumps(body.body_json()),
            response=body.origin_record(),
            continuous_usage=body.continuous_usage,
        )
        try:
            meta = await self.store.create(
                job,
                stream_format=stream_format,
                owner=owner,
                include_usage=body.include_usage,
                choices=body.n,
                role=body.reply_role() if isinstance(body, ChatCompletionRequest) else "assistant",
                token_ids=body.wants_token_ids(),
            )
        except BaseException:
            if idem_key is not None:
                await self.store.redis.delete(idem_key)
            raise
        log.info(
            "request %s accepted for key %s: model %s, %s, %s, max_tokens %s",
            request_id,
            caller.name,
            body.model,
            kind,
            stream_format,
            job.sampling.max_tokens,
            extra=about(request_id),
        )
        return Submitted(request_id, created=True, meta=meta)

    def check(self, body: ChatCompletionRequest | CompletionRequest) -> None:
        """The checks that need nothing but the request, run before anything is held for it (an open-stream
        place, a per-minute count): text the wire format cannot carry (a lone UTF-16 surrogate, in any
        field), and a prompt or a max_tokens larger than this gateway and this key accept."""
        sent = body.model_dump(exclude_none=True)
        if not wire.carries(sent):  # the common case costs one C call; a refusal names its field
            bad = wire.unencodable_text(sent)
            if bad is not None:
                raise invalid_text(bad)
            big = wire.unencodable_integer(sent)
            if big is not None:
                raise bad_request(
                    f"invalid value for {big!r}: an integer must fit in 64 bits", param=big, code="invalid_value"
                )
        self._check_size(body)
        if isinstance(body, ChatCompletionRequest) and self._requested_max_tokens(body) == 0:
            raise no_tokens()

    async def earlier_request(
        self, body: ChatCompletionRequest | CompletionRequest, caller: Principal, idempotency_key: str
    ) -> str | None:
        """The request an Idempotency-Key named for this body (422 for another body), or None: a lookup that
        submits nothing, for a POST that continues a stream (it carries Last-Event-ID)."""
        record = self._idempotency_record(caller.owner, idempotency_key)
        return await self._earlier(record, self._fingerprint(body))

    @staticmethod
    def _idempotency_record(owner: str, idempotency_key: str) -> str:
        if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise APIError(
                400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters", param="Idempotency-Key"
            )
        return keys.idempotency_key(owner, idempotency_key)

    def _check_size(self, body: ChatCompletionRequest | CompletionRequest) -> None:
        settings = self.settings
        if isinstance(body, ChatCompletionRequest):
            if len(body.messages) > settings.max_messages:
                raise bad_request(
                    f"at most {settings.max_messages} messages are accepted (got {len(body.messages)})",
                    param="messages",
                    code="too_many_messages",
                )
            chars = sum(len(m.text()) for m in body.messages)
            param = "messages"
        else:
            chars = body.prompt_size()
            param = "prompt"
        if chars > settings.max_prompt_chars:
            raise bad_request(
                f"the prompt is {chars} characters; at most {settings.max_prompt_chars} are accepted",
                param=param,
                code="prompt_too_long",
            )
        requested = self._requested_max_tokens(body)
        if settings.key_max_tokens and requested is not None and requested > settings.key_max_tokens:
            raise bad_request(
                f"max_tokens {requested} is above this API key's cap of {settings.key_max_tokens}",
                param="max_tokens",
                code="max_tokens_above_limit",
            )

    async def status(self, request_id: str, caller: Principal) -> RequestMeta:
        """The request's metadata; 404 when it is unknown or not the caller's (the same answer)."""
        meta = await self.store.meta(request_id) if keys.is_request_id(request_id) else None
        if meta is None or meta.owner != caller.owner:
            raise not_found(f"no request {request_id!r}", code="request_not_found")
        return meta

    async def cancel(self, request_id: str, caller: Principal) -> str:
        """Stop the caller's request: ``cancelled`` (it was queued: ended now) or ``cancelling`` (running: its
        worker stops within one engine step). 404 unknown or not the caller's, 409 already ended."""
        if not keys.is_request_id(request_id):
            raise not_found(f"no request {request_id!r}", code="request_not_found")
        code, state = await self.store.cancel(request_id, caller.owner)
        if code == -1:
            raise not_found(f"no request {request_id!r}", code="request_not_found")
        if code == 0:
            raise APIError(409, f"request {request_id} already ended ({state})", code="request_ended")
        return "cancelled" if code == 1 else "cancelling"

    def _check_against_model(self, body: ChatCompletionRequest | CompletionRequest, model: ModelEntry) -> None:
        """Refuse what the model's workers cannot do, before anything is stored."""
        for feature in body.engine_features():
            if feature in model.unsupported:
                param = body.feature_params.get(feature, feature)
                raise APIError(
                    400,
                    f"{param!r} is not supported by the {model.engine} engine that serves model {body.model!r} "
                    "(a vLLM worker serves it)",
                    param=param,
                    code="unsupported_parameter",
                )
        if isinstance(body, CompletionRequest) and body.max_tokens == 0 and "echo" in model.unsupported:
            raise bad_request(
                f"max_tokens must be at least 1 (0 is for echo, which the {model.engine} engine that serves model "
                f"{body.model!r} does not do)",
                param="max_tokens",
                code="invalid_value",
            )
        if body.wants_logprobs() and "logprobs" in model.unsupported:
            raise APIError(
                400,
                f"logprobs are not supported by model {body.model!r}",
                param="logprobs",
                code="unsupported_parameter",
            )
        max_tokens = self._requested_max_tokens(body)
        if model.max_model_len and max_tokens is not None and max_tokens >= model.max_model_len:
            raise APIError(
                400,
                f"max_tokens {max_tokens} does not fit model {body.model!r}, whose context is "
                f"{model.max_model_len} tokens including the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def _max_tokens(self, body: ChatCompletionRequest | CompletionRequest, model: ModelEntry) -> int | None:
        """The request's max_tokens, else the key's cap when the model's context is larger (the context
        bounds a reply anyway), else None: what fits the context."""
        requested = self._requested_max_tokens(body)
        if requested is not None:
            return requested
        cap = self.settings.key_max_tokens
        return cap if cap and not (model.max_model_len and cap >= model.max_model_len) else None

    @staticmethod
    def _requested_max_tokens(body: ChatCompletionRequest | CompletionRequest) -> int | None:
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
