"""The simulated engine: a stand-in for a GPU, for broker tests, demos and benchmarks.

It is not a language model and says so (in ``owned_by`` and in the worker's log). What it does model is
what the broker sees of a real engine: a time to first token, then one token per engine step for every
running request at once (all requests advance on one shared step clock, as under continuous batching),
a bounded number of concurrent sequences, stop strings, ``max_tokens``, and cancellation. Its output is
deterministic for a given prompt and seed — filler words from a fixed vocabulary — so tests can compare
an interrupted stream with an uninterrupted one, and a continuation (``emitted_token_ids``) produces
exactly the rest of the uninterrupted reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import random
from collections.abc import AsyncIterator, Sequence
from typing import Final

from prometheus_client.registry import Collector

from tokenspool.shared.features import ENGINE_FEATURES
from tokenspool.shared.wire import TokenLogprob
from tokenspool.worker.engines.base import EngineDelta, EngineError, EngineRequest
from tokenspool.worker.settings import WorkerSettings

VOCABULARY: Final = tuple(
    [
        "the",
        "a",
        "of",
        "and",
        "to",
        "in",
        "is",
        "that",
        "it",
        "for",
        "on",
        "with",
        "as",
        "was",
        "at",
        "by",
        "an",
        "be",
        "this",
        "from",
        "are",
        "or",
        "have",
        "not",
        "but",
        "stream",
        "token",
        "broker",
        "queue",
        "event",
        "replay",
        "gateway",
        "worker",
        "request",
        "reply",
        "model",
        "redis",
        "client",
        "server",
        "river",
        "stone",
        "light",
        "cloud",
        "paper",
        "window",
        "garden",
        "signal",
        "harbor",
        "lantern",
        "meadow",
        "orbit",
        "pixel",
        "quiet",
        "rapid",
        "silver",
        "timber",
        "velvet",
        "amber",
        "bright",
        "calm",
        "distant",
        "early",
        "gentle",
        "hollow",
        "narrow",
        "open",
        "plain",
        "steady",
        "warm",
        "carry",
        "follow",
        "gather",
        "listen",
        "measure",
        "notice",
        "open",
        "reach",
        "settle",
        "travel",
        "wander",
        "whisper",
        "answer",
        "begin",
        "again",
        "always",
        "before",
        "between",
        "during",
        "inside",
        "nothing",
        "nearly",
        "often",
        "perhaps",
        "rather",
        "second",
        "simply",
        "today",
        "together",
        "under",
        "until",
        "within",
        "without",
        "yellow",
        "zero",
        "seven",
        "eleven",
        "hundred",
        "morning",
        "evening",
    ]
)
SIM_OWNED_BY: Final = "tokenspool-sim (simulated engine: deterministic filler words, not a language model)"


def prompt_text(request: EngineRequest) -> str:
    if request.kind == "chat":
        return "\n".join(f"{message.role}: {message.content}" for message in request.messages)
    return request.prompt


class SimEngine:
    """Deterministic, step-clocked, cancellable token generator."""

    name = "sim"
    owned_by = SIM_OWNED_BY
    max_model_len = 0
    unsupported: frozenset[str] = ENGINE_FEATURES
    """It writes filler words: tools, structured output, several choices and vLLM's own generation
    parameters are refused at the gateway with a 400 naming this engine."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.model_name = settings.served_model_name or settings.model or "tokenspool-sim"
        self.capacity = settings.max_num_seqs
        self._ttft_s = settings.sim_ttft_ms / 1000
        self._step_s = settings.sim_itl_ms / 1000
        self._natural_max = settings.sim_default_max_tokens
        self._fail_marker = settings.sim_fail_marker
        self._crash_marker = settings.sim_crash_marker
        self._running = 0

    def running_requests(self) -> int:
        return self._running

    def dead(self) -> str | None:
        return None

    def metric_collectors(self) -> Sequence[Collector]:
        return ()

    async def start(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    def plan(self, request: EngineRequest) -> tuple[list[int], int]:
        """The whole reply this request would get uninterrupted: (token ids, prompt tokens)."""
        text = prompt_text(request)
        digest = hashlib.sha256(f"{text}\0{request.sampling.seed}".encode()).digest()
        rng = random.Random(digest)
        natural = rng.randint(max(1, self._natural_max // 2), self._natural_max)
        limit = natural if request.sampling.max_tokens is None else min(natural, request.sampling.max_tokens)
        if request.sampling.ignore_eos and request.sampling.max_tokens is not None:
            limit = request.sampling.max_tokens  # like a real engine told to ignore its end-of-sequence token
        return [rng.randrange(len(VOCABULARY)) for _ in range(limit)], max(1, len(text.split()))

    def _first_step_at_or_after(self, earliest: float) -> int:
        """The number of the first step boundary at or after ``earliest`` (boundaries are whole multiples of
        the step on the loop's clock, shared by every request). Steps are counted, not added up as floats:
        ``ceil((k * step + step) / step)`` is ``k + 2`` for a large share of clock values (the float division
        lands just above ``k + 1``), which made every other token wait two steps."""
        return math.ceil(earliest / self._step_s - 1e-6)  # within a millionth of a step counts as on it

    async def _sleep_until_step(self, step: int) -> int:
        """Sleep until step ``step``'s boundary; return ``step``."""
        delay = step * self._step_s - asyncio.get_running_loop().time()
        await asyncio.sleep(delay if delay > 0 else 0)
        return step

    async def _sleep_until(self, earliest: float) -> int:
        """Sleep to the first step boundary at or after ``earliest`` (at once with no step); its number."""
        if self._step_s <= 0:
            delay = earliest - asyncio.get_running_loop().time()
            await asyncio.sleep(delay if delay > 0 else 0)
            return 0
        return await self._sleep_until_step(self._first_step_at_or_after(earliest))

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        self._running += 1
        try:
            async for delta in self._generate(request):
                yield delta
        finally:
            self._running -= 1

    async def _generate(self, request: EngineRequest) -> AsyncIterator[EngineDelta]:
        token_ids, prompt_tokens = self.plan(request)
        requested = request.sampling.max_tokens
        natural_stop = requested is None or len(token_ids) < requested
        loop = asyncio.get_running_loop()
        step = await self._sleep_until(loop.time() + self._ttft_s)
        done = len(request.emitted_token_ids)
        # What was already emitted counts for stop strings that span the resume point.
        text_so_far = "".join(VOCABULARY[t] if i == 0 else " " + VOCABULARY[t] for i, t in enumerate(token_ids[:done]))
        for index in range(done, len(token_ids)):
            word = VOCABULARY[token_ids[index]]
            piece = word if index == 0 else " " + word
            last = index == len(token_ids) - 1
            cut = self._stop_position(text_so_far + piece, request.sampling.stop)
            logprobs = self._logprobs(token_ids[index], piece, request.sampling.logprobs)
            if cut is not None:
                yield EngineDelta(
                    piece[: max(0, cut - len(text_so_far))], (token_ids[index],), "stop", prompt_tokens, logprobs
                )
                return
            text_so_far += piece
            finish = ("stop" if natural_stop else "length") if last else None
            yield EngineDelta(piece, (token_ids[index],), finish, prompt_tokens, logprobs)
            if self._fail_marker and self._fail_marker in prompt_text(request):
                raise EngineError("simulated engine failure: the prompt contains the configured failure marker")
            if self._crash_marker and self._crash_marker in prompt_text(request):
                await asyncio.sleep(0.2)  # let the token reach Redis, then die as a crashing GPU process would
                os._exit(70)
            if not last:
                # The next step is one step after this one, however long the consumer took with this token:
                # a real engine keeps stepping while its output waits to be read.
                if self._step_s > 0:
                    step = await self._sleep_until_step(step + 1)
                else:
                    await asyncio.sleep(0)
        if done >= len(token_ids):
            yield EngineDelta("", (), "stop" if natural_stop else "length", prompt_tokens)

    @staticmethod
    def _logprobs(token_id: int, piece: str, top: int | None) -> tuple[TokenLogprob, ...]:
        """The sim draws words uniformly: every word has log probability -ln(vocabulary size). The token is
        the piece of text it added (the word and the space before it), as a real tokenizer's would be."""
        if top is None:
            return ()
        uniform = -math.log(len(VOCABULARY))
        alternatives = tuple((VOCABULARY[(token_id + offset) % len(VOCABULARY)], uniform) for offset in range(top))
        return (TokenLogprob(piece, uniform, alternatives),)

    @staticmethod
    def _stop_position(text: str, stops: tuple[str, ...]) -> int | None:
        found = [pos for pos in (text.find(stop) for stop in stops if stop) if pos >= 0]
        return min(found) if found else None
