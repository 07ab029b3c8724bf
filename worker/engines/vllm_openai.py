"""The OpenAI API on the vLLM engine, by vLLM's own code: a stored request body is validated by vLLM's
protocol classes, rendered by vLLM's ``OnlineRenderer`` (chat template, tools, ``adjust_request``'s
structured-output grammar for ``tool_choice``, ``response_format``), turned into ``SamplingParams`` by
the request's own ``to_sampling_params``, and the engine's outputs are split into content, reasoning and
tool-call pieces by the ``Parser`` class ``vllm serve`` builds from the same flags, one parser per choice,
called once per engine step as vLLM's chat server calls it.

Imported only by the vLLM engine once vLLM is known to be installed.

A parser's state cannot be stored, but it is a function of the token chunks it was fed: a worker that
takes a request over rebuilds it by replaying the stored deltas' token ids, with their boundaries, through
a fresh parser and discarding what it says (as vLLM's ``OnlineDerenderer`` does for its stateless stream
derender). The text each replayed chunk decoded to is recomputed by decoding the choice's tokens so far.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vllm.entrypoints.generate.base.protocol import DeltaMessage, ToolCall
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionRequest,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatMessage,
)
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls
from vllm.inputs import tokens_input
from vllm.renderers.chat_utils import load_chat_template, make_tool_call_id
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM

from tokenspool.shared.wire import TokenLogprob
from tokenspool.worker.engines.base import EngineError


class InvalidRequestError(EngineError):
    """vLLM refused the request as its OpenAI server would: the stream ends with an error event whose type
    is the one ``vllm serve`` answers (``BadRequestError`` for a 400, ``NotFoundError``, ...), which the
    gateway turns into the same HTTP status when it comes before anything was streamed."""

    def __init__(self, problem: ErrorResponse | Exception) -> None:
        error = (problem if isinstance(problem, ErrorResponse) else create_error_response(problem)).error
        super().__init__(error.message)
        self.error_type = error.type
        self.param = error.param or ""


@dataclass(frozen=True, slots=True)
class ParserFlags:
    """The ``vllm serve`` flags that shape rendering and parsing, with their ``vllm serve`` names."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str = ""
    reasoning_parser: str = ""
    chat_template: str = ""
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PromptRun:
    """One engine request of a request: a prompt, with sampling parameters whose ``max_tokens`` fits it. A
    completion with a list of prompts has one per prompt, as ``vllm serve`` runs it; prompt ``p``'s ``j``-th
    choice is choice ``p * n + j``."""

    token_ids: list[int]
    params: SamplingParams
    echo: str = ""
    """What each of its choices starts with (``echo``: a completion's prompt, a chat's last message when it is
    in the reply's role, as vLLM's servers echo)."""
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    """The prompt's logprobs, from its first output (a completion's ``echo`` with ``logprobs``)."""
    media: dict[str, Any] | None = None
    """A multimodal prompt's rendered input less its token ids (the processed images, their hashes and
    placeholder positions), for the engine with whichever token ids it is given: the prompt's own, or the
    prompt plus what was emitted (placeholders sit inside the prompt, so a continuation keeps them)."""

    def engine_input(self, token_ids: list[int]) -> Any:
        """The engine input for ``token_ids``: token ids alone, or with this prompt's media."""
        if self.media is None:
            return tokens_input(token_ids)
        return {**self.media, "prompt_token_ids": token_ids}


@dataclass(slots=True)
class Rendered:
    """A request rendered for the engine, and how to read its outputs."""

    request: ChatCompletionRequest | CompletionRequest
    prompt_ids: list[int]
    params: SamplingParams
    generate_kwargs: dict[str, Any]
    parsers: list[Any]
    """One vLLM ``Parser`` per choice (chat with a tool or reasoning parser configured), else empty."""
    new_parser: Callable[[], Any] | None = None
    """Makes a fresh parser (for the whole-output parse of :meth:`answer`)."""
    enable_auto_tools: bool = False
    tools_streamed: list[bool] = field(default_factory=list)
    emitted: list[list[int]] = field(default_factory=list)
    """Each choice's output token ids so far (for decoding replayed chunks)."""
    texts: list[list[str]] = field(default_factory=list)
    """Each choice's output text so far as vLLM's detokenizer wrote it (without the stop token's text), in
    pieces joined only by :meth:`answer`, its one reader: adding each step's text to one string copied the
    whole string every step (quadratic in the reply's length)."""
    streamed: list[tuple[list[str], list[str]]] = field(default_factory=list)
    """Each choice's content and reasoning as streamed so far (the parsers' deltas), in pieces likewise."""
    runs: list[PromptRun] = field(default_factory=list)
    """The engine requests, one per prompt (the first is ``prompt_ids`` with ``params``)."""
    echo_only: bool = False
    """``echo`` with ``max_tokens`` 0: each choice is its prompt alone (vLLM still samples one token)."""
    echo_logprobs: bool = False
    """A completion's ``echo`` with ``logprobs``: each choice's logprobs start with its prompt's."""

    @property
    def choices(self) -> int:
        return self.params.n * len(self.runs)

    @property
    def shown_logprobs(self) -> int | None:
        """How many of a position's candidates (vLLM's map: the sampled token, then the top ones) its logprobs
        show, as vLLM's servers show them: a chat ``top_logprobs`` of them, a completion ``logprobs + 1`` (the
        sampled token besides the top ones, OpenAI's rule); all for -1; None: no logprobs. A chat read by
        parsers without its reasoning (``include_reasoning: false``) shows none, streamed or not, as vLLM's chat
        server hides them then (their tokens would spell the reasoning)."""
        top = self.params.logprobs
        if isinstance(self.request, ChatCompletionRequest) and self.parsers and not self.request.include_reasoning:
            return None
        if top is None or top < 0 or isinstance(self.request, ChatCompletionRequest):
            return top
        return top + 1

    @property
    def shows_prompt_ids(self) -> bool:
        """Whether a choice's answer names its prompt's token ids: with ``return_token_ids``, and in a
        completion stream that echoes its prompt (vLLM's names the echoed prompt's ids on its first chunk)."""
        return bool(self.request.return_token_ids) or (
            isinstance(self.request, CompletionRequest) and bool(self.request.echo)
        )

    @property
    def needs_fresh_run(self) -> bool:
        """A continuation cannot start mid-output: the grammar of a structured output, and the choices of
        ``n > 1`` or of several prompts, start from the prompt. Such a request is generated again and what was
        delivered skipped."""
        return self.params.structured_outputs is not None or self.choices > 1

    def echoed(
        self, run: PromptRun, text: str, logprobs: tuple[TokenLogprob, ...]
    ) -> tuple[str, tuple[TokenLogprob, ...]]:
        """A choice's first delta with its prompt echoed before it, as vLLM's servers send it (the prompt's
        logprobs too, when the request asked for logprobs)."""
        if self.echo_only:
            return run.echo, run.prompt_logprobs or ()
        return run.echo + text, (run.prompt_logprobs or ()) + logprobs

    def replay(self, tokenizer: Any, chunks: tuple[tuple[int, tuple[int, ...]], ...]) -> None:
        """Feed the chunks an earlier attempt streamed to this attempt's parsers, discarding their output."""
        for index, token_ids in chunks:
            before = self.emitted[index]
            text = self._decode(tokenizer, before, list(token_ids))
            before.extend(token_ids)
            self.texts[index].append(text)
            if self.parsers:
                delta = self.parsers[index].parse_delta(
                    delta_text=text,
                    delta_token_ids=list(token_ids),
                    request=self.request,
                    prompt_token_ids=self.prompt_ids,
                    finished=False,
                )
                self._note_streamed(index, delta)

    def _note_streamed(self, index: int, delta: DeltaMessage | None) -> None:
        if delta is not None:
            content, reasoning = self.streamed[index]
            if delta.content:
                content.append(delta.content)
            if delta.reasoning:
                reasoning.append(delta.reasoning)
            if delta.tool_calls:
                self.tools_streamed[index] = True

    def decode_tail(self, tokenizer: Any, index: int, new: list[int]) -> str:
        """The text ``new`` adds after the choice's tokens so far (its first new tokens after a skip)."""
        return self._decode(tokenizer, self.emitted[index], new)

    def _decode(self, tokenizer: Any, before: list[int], new: list[int]) -> str:
        skip = self.params.skip_special_tokens
        full: str = tokenizer.decode(before + new, skip_special_tokens=skip)
        head: str = tokenizer.decode(before, skip_special_tokens=skip) if before else ""
        return full[len(head) :] if full.startswith(head) else full

    def answer(self, index: int, finish_reason: str, streamed_finish: str) -> str:
        """The choice's message and finish reason as ``vllm serve`` answers a request that is not streamed,
        as JSON: vLLM parses the whole output again with a fresh parser, which may say other things than the
        streamed pieces (arguments re-serialised, an unfinished call left as content, ``content: null`` for a
        reply that was all reasoning). Mirrors the message construction of vLLM's
        ``OpenAIServingChat.chat_completion_full_generator``. Empty when the streamed pieces fold into the same
        answer (no tool calls, the same content, reasoning and finish reason): only what differs is stored."""
        request = self.request
        assert isinstance(request, ChatCompletionRequest) and self.new_parser is not None
        parser = self.new_parser()
        parser.set_prompt_token_ids(self.prompt_ids)
        reasoning, content, calls = parser.parse(
            "".join(self.texts[index]),
            request,
            enable_auto_tools=self.enable_auto_tools,
            model_output_token_ids=self.emitted[index],
        )
        if not request.include_reasoning:
            reasoning = None
        named = type(request.tool_choice) is ChatCompletionNamedToolChoiceParam
        required = request.tool_choice == "required"
        tool_calls = [ToolCall(id=call.id or make_tool_call_id(), function=call) for call in calls or []]
        auto = bool(request.tools) and request.tool_choice == "auto" and parser.tool_parser_cls is not None
        if named or required:
            message = ChatMessage(role="assistant", reasoning=reasoning, content=content or "", tool_calls=tool_calls)
        elif auto and self.enable_auto_tools and tool_calls:
            message = ChatMessage(role="assistant", reasoning=reasoning, content=content, tool_calls=tool_calls)
        else:
            message = ChatMessage(role="assistant", reasoning=reasoning, content=content)
        if (auto and self.enable_auto_tools and tool_calls) or (required and finish_reason == "stop"):
            finish_reason = "tool_calls"
        choice = maybe_filter_parallel_tool_calls(
            ChatCompletionResponseChoice(index=index, message=message, finish_reason=finish_reason), request
        )
        body = choice.message.model_dump(include={"content", "reasoning", "tool_calls"})
        content_pieces, reasoning_pieces = self.streamed[index]
        folds_alike = (body.get("content"), body.get("reasoning"), choice.finish_reason) == (
            "".join(content_pieces),
            "".join(reasoning_pieces) or None,
            streamed_finish,
        )
        if folds_alike and not body.get("tool_calls") and not self.tools_streamed[index]:  # dropped when empty
            return ""
        return json.dumps({**body, "finish_reason": choice.finish_reason}, separators=(",", ":"))

    def reasoning_tokens(self, index: int, finished: bool) -> int | None:
        """The choice's reasoning tokens so far, as vLLM counts them for ``usage.completion_tokens_details``:
        at its end, and at every step of a request with usage on every chunk (``continuous_usage_stats``,
        whose chunks vLLM gives the count so far); only with a reasoning parser, None otherwise."""
        if not self.parsers or self.parsers[index].reasoning_parser is None:
            return None
        options = self.request.stream_options
        if not (finished or (options is not None and options.include_usage and options.continuous_usage_stats)):
            return None
        return int(self.parsers[index].count_reasoning_tokens(self.emitted[index]))

    def parse(
        self, index: int, text: str, token_ids: list[int], finish_reason: str | None
    ) -> tuple[str, str, str, str | None, str] | None:
        """One engine step of one choice as (content, reasoning, tool_calls JSON, finish reason, and on the
        choice's last step its :meth:`answer`), or None when vLLM's server would send nothing for it (a
        parser holding back markup)."""
        self.emitted[index].extend(token_ids)
        self.texts[index].append(text)
        if not self.parsers:
            return text, "", "", finish_reason, ""
        assert isinstance(self.request, ChatCompletionRequest)
        delta: DeltaMessage | None = self.parsers[index].parse_delta(
            delta_text=text,
            delta_token_ids=token_ids,
            request=self.request,
            prompt_token_ids=self.prompt_ids,
            finished=finish_reason is not None,
        )
        if delta is None:
            if finish_reason is None:
                return None
            delta = DeltaMessage()
        engine_finish = finish_reason
        if finish_reason == "stop" and (self.tools_streamed[index] or delta.tool_calls):
            named = isinstance(self.request.tool_choice, ChatCompletionNamedToolChoiceParam)
            finish_reason = "stop" if named else "tool_calls"
        choice = maybe_filter_parallel_tool_calls(
            ChatCompletionResponseStreamChoice(index=index, delta=delta, finish_reason=finish_reason), self.request
        )
        delta = choice.delta
        self._note_streamed(index, delta)
        tool_calls = ""
        if delta.tool_calls:
            tool_calls = json.dumps(
                [call.model_dump(exclude_unset=True) for call in delta.tool_calls], separators=(",", ":")
            )
        answer = self.answer(index, engine_finish, finish_reason) if engine_finish and finish_reason else ""
        return delta.content or "", delta.reasoning or "", tool_calls, finish_reason, answer


class OpenAIFrontEnd:
    """vLLM's renderer and parser classes for one engine, built as ``vllm serve`` builds them."""

    def __init__(self, engine: AsyncLLM, flags: ParserFlags) -> None:
        self._engine = engine
        self._model_config = engine.model_config
        self.renderer = OnlineRenderer(
            model_config=engine.model_config,
            renderer=engine.renderer,
            request_logger=None,
            chat_template=load_chat_template(flags.chat_template or None),
            chat_template_content_format="auto",
            enable_auto_tools=flags.enable_auto_tool_choice,
            tool_parser=flags.tool_call_parser or None,
            reasoning_parser=flags.reasoning_parser,
            default_chat_template_kwargs=flags.default_chat_template_kwargs,
        )
        self.default_sampling = dict(engine.model_config.get_diff_sampling_param())
        self.tokenizer = engine.renderer.get_tokenizer()
        self._enable_auto_tools = flags.enable_auto_tool_choice

    async def render(self, kind: str, body: bytes, max_model_len: int) -> Rendered:
        """The request's prompt ids, sampling parameters and parsers; :class:`InvalidRequestError` with the
        type and message ``vllm serve`` answers for whatever rendering raises (vLLM's ``VLLMValidationError``
        is no ``ValueError``: its error mapping, not the exception's class, says what the client sees)."""
        try:
            return await self._render(kind, body, max_model_len)
        except InvalidRequestError:
            raise
        except Exception as exc:
            raise InvalidRequestError(exc) from exc

    async def _render(self, kind: str, body: bytes, max_model_len: int) -> Rendered:
        try:
            raw = json.loads(body)
            request: ChatCompletionRequest | CompletionRequest = (
                ChatCompletionRequest.model_validate(raw) if kind == "chat" else CompletionRequest.model_validate(raw)
            )
        except ValueError as exc:
            raise InvalidRequestError(exc) from exc
        parsers: list[Any] = []
        new_parser: Callable[[], Any] | None = None
        echoes: list[str]
        if isinstance(request, ChatCompletionRequest):
            result = await self.renderer.render_chat(request)
            if isinstance(result, ErrorResponse):
                raise InvalidRequestError(result)
            conversation, engine_inputs = result
            if len(engine_inputs) != 1:
                raise InvalidRequestError(ValueError(f"expected exactly one prompt, got {len(engine_inputs)}"))
            echoes = [_chat_echo(request, conversation)]
        else:
            completion = await self.renderer.render_completion(request)
            if isinstance(completion, ErrorResponse):
                raise InvalidRequestError(completion)
            engine_inputs = completion
            # With ``return_token_ids`` vLLM echoes the prompt's ids, not its text (its logprobs still).
            echoed = request.echo and not request.return_token_ids
            echoes = [str(engine_input.get("prompt") or "") if echoed else "" for engine_input in engine_inputs]
        requested = (
            request.max_completion_tokens
            if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None
            else request.max_tokens
        )
        runs = []
        for engine_input, echo in zip(engine_inputs, echoes, strict=True):
            token_ids = [int(token) for token in engine_input["prompt_token_ids"]]  # type: ignore[typeddict-item]
            try:
                max_tokens = get_max_tokens(max_model_len, requested, len(token_ids), self.default_sampling)
                run_params = request.to_sampling_params(max_tokens, self.default_sampling)
            except ValueError as exc:
                raise InvalidRequestError(exc) from exc
            run_params.output_kind = RequestOutputKind.DELTA
            media = None
            if engine_input.get("type") == "multimodal":  # image parts, rendered by the model's processor
                media = {key: value for key, value in engine_input.items() if key != "prompt_token_ids"}
            runs.append(PromptRun(token_ids, run_params, echo, media=media))
        prompt_ids, params = runs[0].token_ids, runs[0].params
        generate_kwargs: dict[str, Any] = {"priority": request.priority}
        parser_cls = self.renderer.parser
        if isinstance(request, ChatCompletionRequest) and parser_cls is not None:
            template_kwargs = self.renderer.effective_chat_template_kwargs(request)
            tools: list[Any] | None = list(request.tools) if request.tools is not None else None

            def make_parser() -> Any:
                return parser_cls(
                    self.tokenizer, tools, chat_template_kwargs=template_kwargs, model_config=self._model_config
                )

            new_parser = make_parser
            parsers = [make_parser() for _ in range(params.n)]
            reasoning_kwargs = None
            if parsers[0].reasoning_parser is not None:
                reasoning_kwargs = {"chat_template_kwargs": template_kwargs}
            generate_kwargs["reasoning_ended"] = request.resolve_reasoning_ended(parsers[0], prompt_ids)
            generate_kwargs["reasoning_parser_kwargs"] = reasoning_kwargs
        choices = params.n * len(runs)
        return Rendered(
            request,
            prompt_ids,
            params,
            generate_kwargs,
            parsers,
            new_parser,
            self._enable_auto_tools,
            tools_streamed=[False] * choices,
            emitted=[[] for _ in range(choices)],
            texts=[[] for _ in range(choices)],
            streamed=[([], []) for _ in range(choices)],
            runs=runs,
            echo_only=isinstance(request, CompletionRequest) and bool(request.echo) and request.max_tokens == 0,
            echo_logprobs=isinstance(request, CompletionRequest) and bool(request.echo) and params.logprobs is not None,
        )


def _chat_echo(request: ChatCompletionRequest, conversation: list[Any]) -> str:
    """What a chat reply starts with under ``echo``: the last message, when it is in the reply's role (the
    assistant's, or the last message's own without a generation prompt), as vLLM's chat server echoes it."""
    if not request.echo or not conversation:
        return ""
    role = "assistant" if request.add_generation_prompt else request.messages[-1]["role"]
    last = conversation[-1]
    if "content" not in last or last.get("role") != role:
        return ""
    content = last["content"] or ""
    return content if isinstance(content, str) else "\n".join(part["text"] for part in content)
