"""The engine interface the worker drives: a model that streams deltas for many requests at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.registry import Collector

from tokenspool.shared.wire import ChatMessage, SamplingOptions, TokenLogprob


class EngineError(Exception):
    """This request failed in the engine; the stream ends with an error event of type ``error_type``, the
    worker goes on."""

    error_type: str = "engine_error"
    param: str = ""
    """The request parameter the refusal names (vLLM's error ``param``), stored with the error event."""


class EngineDeadError(Exception):
    """The engine itself is gone; the worker must stop pulling and exit non-zero."""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One generation, as the engine sees it.

    ``emitted_token_ids`` are tokens already delivered to the client by an earlier attempt: the
    engine continues after them (prompt + emitted) and spends only the remaining ``max_tokens``.
    """

    request_id: str
    kind: str
    prompt: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingOptions
    emitted_token_ids: tuple[int, ...] = ()
    body: bytes = b""
    """The OpenAI request's JSON (``Job.body``), which the vLLM engine renders with vLLM's own code."""
    emitted: tuple[tuple[int, tuple[int, ...]], ...] = ()
    """The earlier attempts' deltas as (choice index, token ids), one per stored event: an engine that
    parses its output (tool calls, reasoning) replays them through fresh parsers with the same boundaries."""


@dataclass(frozen=True, slots=True)
class EngineDelta:
    """New output of one request since its previous delta.

    ``finish_reason`` is set on the last delta only (``stop`` or ``length``); ``prompt_tokens`` is the
    prompt's length in tokens as the engine counted it.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    """One entry per token id when the request asked for log probabilities."""
    index: int = 0
    """The choice (``n > 1``)."""
    reasoning: str = ""
    tool_calls: str = ""
    """Rendered JSON array of OpenAI ``delta.tool_calls`` pieces (empty: none); ``text`` is then the
    content vLLM's parsers left, not every generated character."""
    answer: str = ""
    """On a choice's last delta, with a parser: the choice as a request that is not streamed gets it (JSON,
    see :class:`~tokenspool.shared.wire.Event`)."""
    reasoning_tokens: int | None = None
    """With a reasoning parser, on a choice's last delta (and on every delta of a request with usage on every
    chunk): the choice's reasoning tokens so far (usage details)."""
    request_prompt_tokens: int = 0
    """The tokens of all the request's prompts, when it has several (a completion with a list of prompts:
    ``prompt_tokens`` is then this choice's prompt, and the request's usage counts them all); 0 otherwise."""
    prompt_token_ids: tuple[int, ...] = ()
    """This choice's prompt, on its first delta, when its answer names them (``Rendered.shows_prompt_ids``)."""


class Engine(Protocol):
    """An inference engine shared by all requests one worker runs."""

    name: str
    """``sim`` or ``vllm``."""
    model_name: str
    """The model name clients send (and the queue the worker reads)."""
    owned_by: str
    """What ``GET /v1/models`` says serves the model; the simulated engine says it is simulated."""
    capacity: int
    """How many requests it runs at once; the worker pulls no more than this."""

    @property
    def max_model_len(self) -> int:
        """Context length in tokens, known after :meth:`start` (0: no limit)."""

    unsupported: frozenset[str]
    """Request parameters it cannot honour (the gateway refuses them before enqueueing)."""

    def running_requests(self) -> int:
        """Requests the engine itself holds as unfinished (its own count, not the worker's)."""

    def dead(self) -> str | None:
        """Why the engine can no longer run anything, or None while it is healthy. Checked every heartbeat,
        so an engine that dies while idle stops its worker too."""

    def metric_collectors(self) -> Sequence[Collector]:
        """Prometheus collectors of the engine's own metrics, served on the worker's metrics port beside the
        worker's (vLLM: the ``vllm:*`` series its dashboards read). Asked once, after :meth:`start`."""

    async def start(self) -> None:
        """Load the model; raise with a clear message when it cannot."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        """Stream the request's deltas. Closing the iterator early (``aclose`` or cancelling the task
        that iterates it) aborts the request in the engine and frees its slot."""

    async def shutdown(self) -> None:
        """Release the engine."""
