"""The OpenAI request schemas the gateway accepts: a wrong type is a 400 that names it, before anything
reaches Redis; a field it does not know is accepted and ignored, as ``vllm serve`` does (its
``OpenAIBaseModel`` allows extra fields), so the no-op fields SDKs send by default (``metadata``,
``store``, ``service_tier``, ...) pass.

The gateway does not render requests (it runs without vLLM): it checks what it can, then stores the
request's JSON in the job, and a vLLM worker validates and renders it with vLLM's own protocol classes.
:meth:`_GenerationRequest.engine_features` names what the request asks of the engine beyond plain
text, so a worker whose engine cannot do it (the simulated one) is refused with a 400 that names it.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from tokenspool.gateway.errors import InvalidFieldError
from tokenspool.shared.features import VLLM_GENERATION_FIELDS

MAX_STOP_SEQUENCES = 4
_STRICT = ConfigDict(extra="forbid", strict=True)
_OPEN = ConfigDict(extra="allow", strict=True)
"""Typed where tokenspool reads a field, open to the rest, as vLLM's protocol classes are."""
_LAX_BOOL: TypeAdapter[bool] = TypeAdapter(bool)
"""A boolean as vLLM's protocol classes (pydantic, lax) read one that tokenspool leaves untyped."""


def _lax_bool(value: object, unreadable: bool) -> bool:
    """``value`` read as :data:`_LAX_BOOL` reads it; ``unreadable`` when it cannot be (the worker's vLLM
    refuses such a request anyway)."""
    try:
        return _LAX_BOOL.validate_python(value)
    except ValidationError:
        return unreadable


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False
    """With ``include_usage``: every chunk carries the usage so far, as ``vllm serve`` sends it (guidellm asks
    for it)."""


class TextPart(BaseModel):
    model_config = _OPEN
    type: Literal["text"]
    text: str


class MediaPart(BaseModel):
    """An image, audio or file part: only a multimodal model takes it (a vLLM worker answers as vLLM does)."""

    model_config = _OPEN
    type: Annotated[str, Field(min_length=1, max_length=64)]
    text: None = None


def _part_kind(part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return "TextPart" if kind == "text" else "MediaPart"


ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[MediaPart, Tag("MediaPart")], Discriminator(_part_kind)
]
"""A content part: a text part must have its text; any other kind is passed on."""


class FunctionCall(BaseModel):
    model_config = _OPEN
    name: str
    arguments: str | dict[str, JsonValue] | None = None


class ToolCallIn(BaseModel):
    """An assistant message's earlier tool call, in the history."""

    model_config = _OPEN
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageIn(BaseModel):
    model_config = _OPEN
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content)

    def has_media(self) -> bool:
        return isinstance(self.content, list) and any(part.type != "text" for part in self.content)


class FunctionDefinition(BaseModel):
    model_config = _OPEN
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, JsonValue] | None = None
    strict: bool | None = None


class ToolIn(BaseModel):
    model_config = _OPEN
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _OPEN
    name: str


class NamedToolChoice(BaseModel):
    model_config = _OPEN
    type: Literal["function"] = "function"
    function: NamedFunction


class ResponseFormat(BaseModel):
    model_config = _OPEN
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict[str, JsonValue] | None = None


class _GenerationRequest(BaseModel):
    model_config = _OPEN
    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int | None, Field(ge=1, le=1_000_000)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    seed: Annotated[int | None, Field(ge=-(2**63), le=2**63 - 1)] = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str | None, Field(max_length=256)] = None
    n: Annotated[int, Field(ge=1)] = 1
    top_k: Annotated[int | None, Field(ge=-1)] = None
    min_p: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    presence_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    repetition_penalty: Annotated[float | None, Field(gt=0.0, le=2.0)] = None
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]] | None, Field(max_length=64)] = None
    background: bool = False
    """tokenspool: run to the end even if every client leaves (it stays replayable for the retention window)."""

    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, JsonValue] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not stop or len(stop) > 256 for stop in stops):
            raise ValueError("stop sequences must be 1 to 256 characters")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise InvalidFieldError("stream_options", "stream_options is only allowed when stream is true")
        return self

    def wants_logprobs(self) -> bool:
        return self.logprobs_top() is not None

    def logprobs_top(self) -> int | None:
        """How many alternatives per token to return, or None for no log probabilities."""
        return None

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def engine_features(self) -> tuple[str, ...]:
        """What this request asks of the engine beyond plain text generation (names from
        :mod:`tokenspool.shared.features`); an engine that lists one as unsupported gets a 400."""
        used: list[str] = []
        if self.n > 1:
            used.append("n")
        if self.response_format is not None and self.response_format.type != "text":
            used.append("response_format")
        used += sorted(name for name in self.model_extra or {} if name in VLLM_GENERATION_FIELDS)
        if self.structured_outputs is not None:
            used.append("structured_outputs")
        return tuple(used)

    feature_params: ClassVar[dict[str, str]] = {}
    """The parameter the client named for an engine feature, where it is not the feature's own name (a
    Responses API request asks for ``response_format`` as ``text.format``): refusals name what was sent."""

    def origin_record(self) -> bytes:
        """The JSON of the request the client sent, when this one was mapped from it (``POST /v1/responses``
        onto chat), kept in the job so any gateway can answer about it; empty otherwise."""
        return b""

    def body_json(self) -> dict[str, Any]:
        """The request as vLLM's protocol class reads it: what the client sent, less tokenspool's own fields."""
        return self.model_dump(mode="json", exclude_unset=True, exclude={"background"})

    def wants_token_ids(self) -> bool:
        """``return_token_ids`` (vLLM's, read as its boolean field reads it): the answer shows the prompt's and
        each choice's token ids."""
        return _lax_bool((self.model_extra or {}).get("return_token_ids") or False, False)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk: asked for with ``include_usage``, which it needs (vLLM's ``should_include_usage``)."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_tokens: Annotated[int | None, Field(ge=0, le=1_000_000)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=0, le=1_000_000)] = None
    """0 (either one) is refused as ``vllm serve`` refuses it: see :func:`tokenspool.gateway.errors.no_tokens`."""
    logprobs: bool | None = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidFieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        return self

    tools: list[ToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def logprobs_top(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def reply_role(self) -> str:
        """The role of the reply, as vLLM's ``get_chat_request_role`` decides it: the assistant's, or the last
        message's own when the request has no generation prompt (``add_generation_prompt`` false, read as
        vLLM's boolean field reads it; a value it cannot read is refused by the worker anyway)."""
        prompted = _lax_bool((self.model_extra or {}).get("add_generation_prompt", True), True)
        return "assistant" if prompted else self.messages[-1].role

    def engine_features(self) -> tuple[str, ...]:
        used = list(super().engine_features())
        if self.tools and self.tool_choice != "none":
            used.append("tools")
        if any(message.has_media() for message in self.messages):
            used.append("media")
        return tuple(used)


MAX_COMPLETION_PROMPTS = 1024
"""The most prompts one completion request may list: ``vllm serve``'s default (``VLLM_MAX_COMPLETION_PROMPTS``)."""
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_GenerationRequest):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_COMPLETION_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_COMPLETION_PROMPTS)]
    )
    """One prompt (text or token ids) or a list of them, as ``vllm serve`` takes them: each prompt of a list
    runs as its own engine request, and prompt ``p``'s ``j``-th choice has index ``p * n + j``."""
    logprobs: Annotated[int | None, Field(ge=0, le=5)] = None
    max_tokens: Annotated[int | None, Field(ge=0, le=1_000_000)] = None
    """0 is for ``echo`` (the prompt alone); a vLLM worker answers it as vLLM does, with or without echo."""
    echo: bool | None = None
    """Each choice's text starts with its prompt (and its logprobs with the prompt's): done by a vLLM worker."""

    def logprobs_top(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str] | list[list[int]]:
        """Every prompt of the request, as text or as token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return self.prompt

    def prompt_text(self) -> str:
        """The prompt the simulated engine reads: the first one's text (it refuses lists and token ids)."""
        first = self.prompts()[0]
        return first if isinstance(first, str) else ""

    def prompt_size(self) -> int:
        """The prompts' characters, a token id counting as one (what the gateway's prompt limit bounds)."""
        return sum(len(prompt) for prompt in self.prompts())

    def engine_features(self) -> tuple[str, ...]:
        used = list(super().engine_features())
        prompts = self.prompts()
        if len(prompts) > 1:
            used.append("prompt_list")
        if not isinstance(prompts[0], str):
            used.append("prompt_token_ids")
        if self.echo:
            used.append("echo")
        return tuple(used)
