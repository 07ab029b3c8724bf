"""The OpenAI Responses API on tokenspool's request store: what a Responses request is, how it maps onto the
chat request that workers run, and how a response's stored events render as OpenAI's response object and
its stream of typed events.

A response is an ordinary chat request in the store (id ``resp_…``, stream format ``response``): its job
holds the chat body that workers render (with vLLM's own code on a vLLM worker, like any chat request) and
the Responses request itself (``Job.response``), from which any gateway answers about it. Its events are
the chat deltas a worker stores (content, reasoning, tool-call pieces as vLLM's parsers split them).

:class:`ResponseRenderer` turns those events into Responses API events, each with the next
``sequence_number``, as vLLM's ``SimpleStreamingEventProcessor`` does for ``vllm serve``'s ``/v1/responses``
(one output item per run of content, reasoning or one tool call; ``added``, deltas, then ``done``). It reads
nothing but the stored events and the immutable request, so sequence number *N* names the same event on
every gateway and after every failover: a resume (``starting_after=N``) is a replay from the first stored
event with the first *N + 1* rendered events left out. Item ids are derived from the response id and the
item's position, for the same reason. Event and object shapes are the ``openai`` package's own types,
constructed and dumped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Literal

import orjson
from openai.types.responses import (
    FunctionTool,
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseError,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseFunctionToolCallItem,
    ResponseFunctionToolCallOutputItem,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseInputMessageItem,
    ResponseItem,
    ResponseOutputItem,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseStreamEvent,
    ResponseTextConfig,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
)
from openai.types.responses.response import IncompleteDetails
from openai.types.responses.response_reasoning_item import Content as ReasoningContent
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from openai.types.shared import Reasoning
from pydantic import BaseModel, ConfigDict, Field, JsonValue, PrivateAttr, ValidationError, model_validator

from tokenspool.gateway.errors import bad_request, validation_error
from tokenspool.gateway.schemas import ChatCompletionRequest
from tokenspool.gateway.sse import named_frame
from tokenspool.shared import wire
from tokenspool.shared.store import RequestMeta

_OPEN = ConfigDict(extra="allow", strict=True)
"""Typed where tokenspool reads a field, open to the rest (as vLLM's ``ResponsesRequest`` is)."""

MAX_METADATA_KEYS: Final = 16


# -- the request -------------------------------------------------------------------------------------------


class FunctionToolIn(BaseModel):
    """A function tool, in the Responses API's flat shape (the only tool type a self-hosted model runs)."""

    model_config = _OPEN
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, JsonValue] | None = None
    strict: bool | None = None


FUNCTION_FIELDS: Final = frozenset({"name", "description", "parameters", "strict"})
"""What a function tool says of its function (its chat form's ``function`` object)."""


class NamedFunctionChoice(BaseModel):
    model_config = _OPEN
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    json_schema: Annotated[dict[str, JsonValue] | None, Field(alias="schema")] = None
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_needs_name_and_schema(self) -> TextFormat:
        if self.type == "json_schema" and (not self.name or self.json_schema is None):
            raise ValueError("a json_schema format needs a name and a schema")
        return self


class TextConfig(BaseModel):
    model_config = _OPEN
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(BaseModel):
    model_config = _OPEN
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``: the fields tokenspool reads, typed; others are accepted and ignored."""

    model_config = _OPEN
    model: Annotated[str | None, Field(min_length=1, max_length=256)] = None
    input: str | Annotated[list[dict[str, JsonValue]], Field(min_length=1)]
    instructions: str | None = None
    tools: list[FunctionToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: Annotated[int | None, Field(ge=1, le=1_000_000)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    seed: Annotated[int | None, Field(ge=-(2**63), le=2**63 - 1)] = None
    """Not OpenAI's: vLLM's extension (the chat API's ``seed``), for reproducible sampling."""
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    store: bool = True
    background: bool = False
    stream: bool = False
    previous_response_id: str | None = None
    user: Annotated[str | None, Field(max_length=256)] = None

    @model_validator(mode="after")
    def _checks(self) -> ResponsesRequest:
        if self.metadata is not None and len(self.metadata) > MAX_METADATA_KEYS:
            raise ValueError(f"metadata has at most {MAX_METADATA_KEYS} keys")
        if self.background and not self.store:
            raise ValueError("background responses must be stored: background=true needs store=true")
        return self

    def record(self, model: str) -> bytes:
        """What the job keeps of this request: the fields it reads, as the client sent them (the ones it
        ignores are dropped), with the model resolved."""
        known = set(type(self).model_fields)
        fields = self.model_dump(mode="json", by_alias=True, exclude_unset=True, include=known)
        return orjson.dumps({**fields, "model": model})

    @classmethod
    def from_record(cls, record: bytes) -> ResponsesRequest:
        return cls.model_validate_json(record)


class MappedChatRequest(ChatCompletionRequest):
    """The chat request a Responses request runs as: refusals name the Responses parameter, and the job keeps
    the Responses request beside it."""

    feature_params: ClassVar[dict[str, str]] = {
        "response_format": "text.format",
        "reasoning_effort": "reasoning",
        "media": "input",
    }
    _record: bytes = PrivateAttr(default=b"")

    def origin_record(self) -> bytes:
        return self._record

    def engine_features(self) -> tuple[str, ...]:
        # add_special_tokens is the mapping's, not the client's: every engine takes it (the sim ignores it).
        return tuple(feature for feature in super().engine_features() if feature != "add_special_tokens")


# -- Responses input items -> chat messages (as vLLM's construct_input_messages) ------------------------------

_TEXT_PARTS: Final = frozenset({"input_text", "output_text", "text", "refusal"})


def _content(content: JsonValue, param: str) -> str | list[dict[str, Any]]:
    """A message's content as chat content: text parts joined, an image as an ``image_url`` part."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of content parts", param=param)
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(f"{where} must be a content part with a type", param=where)
        kind = part["type"]
        if kind in _TEXT_PARTS:
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise bad_request(f"{where}.text must be a string", param=where)
            parts.append({"type": "text", "text": text})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            message = f"content part type {kind!r} is not supported here"
            raise bad_request(message, param=where, code="unsupported_value")
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _string(item: dict[str, JsonValue], name: str, param: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise bad_request(f"{param}.{name} must be a string", param=f"{param}.{name}")
    return value


def chat_messages(items: list[dict[str, JsonValue]], param: str = "input") -> list[dict[str, Any]]:
    """Responses items as chat messages, merged as vLLM merges them: a function call or reasoning joins the
    assistant message before it, a function call's output becomes a tool message."""
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        where = f"{param}[{index}]"
        previous = messages[-1] if messages and messages[-1]["role"] == "assistant" else None
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"{where}.role must be user, system, developer or assistant", param=f"{where}.role")
            content = _content(item.get("content"), f"{where}.content")
            if role == "assistant" and previous is not None and previous.get("content") is None:
                previous["content"] = content
            else:
                messages.append({"role": role, "content": content})
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", where),
                "type": "function",
                "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)},
            }
            if previous is not None:
                previous.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            result = output if isinstance(output, str) else _content(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": result})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            first = parts[0] if isinstance(parts, list) and parts else {}
            text = first.get("text") if isinstance(first, dict) else None
            reasoning = text if isinstance(text, str) else ""
            if previous is not None and "reasoning" not in previous:
                previous["reasoning"] = reasoning
            else:
                messages.append({"role": "assistant", "content": None, "reasoning": reasoning})
        else:
            raise bad_request(f"input item type {kind!r} is not supported", param=where, code="unsupported_value")
    return messages


def input_items(request: ResponsesRequest) -> list[dict[str, JsonValue]]:
    """The request's input as items (a string input is one user message)."""
    if isinstance(request.input, str):
        return [{"type": "message", "role": "user", "content": request.input}]
    return request.input


def to_chat(
    request: ResponsesRequest, model: str, history: list[dict[str, Any]], previous_output: list[dict[str, Any]]
) -> MappedChatRequest:
    """The chat request a Responses request runs as, after the earlier conversation (``previous_response_id``:
    the previous response's messages, less its instructions, then its output), as vLLM builds it."""
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    messages += [message for message in history if message.get("role") != "system"]
    messages += chat_messages([item for item in previous_output if item.get("type") != "reasoning"], "output")
    messages += chat_messages(input_items(request))
    # vLLM's Responses renderer tokenizes the templated prompt with the tokenizer's special tokens (its
    # ResponsesRequest has no add_special_tokens, the chat request's defaults to false): the same prompt ids.
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "background": request.background,
        "add_special_tokens": True,
    }
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": tool.model_dump(mode="json", exclude_unset=True, include=set(FUNCTION_FIELDS)),
            }
            for tool in request.tools
        ]
    choice = request.tool_choice
    if isinstance(choice, NamedFunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        body["tool_choice"] = choice
    if request.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = request.parallel_tool_calls
    text_format = request.text.format if request.text is not None else None
    if text_format is not None and text_format.type == "json_schema":
        schema: dict[str, Any] = {"name": text_format.name, "schema": text_format.json_schema}
        if text_format.description is not None:
            schema["description"] = text_format.description
        if text_format.strict is not None:
            schema["strict"] = text_format.strict
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif text_format is not None and text_format.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    if request.reasoning is not None and request.reasoning.effort is not None:
        body["reasoning_effort"] = request.reasoning.effort
    optional = {
        "max_completion_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "user": request.user,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    try:
        chat = MappedChatRequest.model_validate(body)
        chat._record = request.record(model)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    except TypeError as exc:  # JSON the store cannot keep (orjson: an integer beyond 64 bits)
        raise bad_request(f"the request cannot be stored as JSON: {exc}", code="invalid_value") from None
    return chat


# -- items, as the input_items list shows them ---------------------------------------------------------------


def listed_item(item: dict[str, JsonValue], item_id: str) -> ResponseItem:
    """One input item as ``GET /v1/responses/{id}/input_items`` lists it (an id given where it has none)."""
    kind = item.get("type", "message")
    fields: dict[str, Any] = {**item, "id": item.get("id") or item_id, "status": item.get("status") or "completed"}
    if kind == "message":
        fields["type"] = "message"
        content = item.get("content")
        if item.get("role") == "assistant":
            if isinstance(content, str):
                fields["content"] = [{"type": "output_text", "text": content, "annotations": []}]
            return ResponseOutputMessage.model_validate(fields)
        if isinstance(content, str):
            fields["content"] = [{"type": "input_text", "text": content}]
        return ResponseInputMessageItem.model_validate(fields)
    if kind == "function_call":
        return ResponseFunctionToolCallItem.model_validate(fields)
    if kind == "function_call_output":
        return ResponseFunctionToolCallOutputItem.model_validate(fields)
    fields.setdefault("summary", [])
    return ResponseReasoningItem.model_validate(fields)


# -- stored events -> Responses events ---------------------------------------------------------------------


def dump(model: BaseModel) -> dict[str, Any]:
    """An ``openai`` object as JSON data: the fields set when it was built (nulls set on purpose included)."""
    return model.model_dump(mode="json", by_alias=True, exclude_unset=True)


def event_frame(event: ResponseStreamEvent) -> bytes:
    """One Responses event as SSE, named by its type as OpenAI sends it (``event: response.created``)."""
    return named_frame(event.type, orjson.dumps(dump(event)))


@dataclass(slots=True)
class _OpenItem:
    """The output item being streamed."""

    kind: Literal["message", "reasoning", "function_call"]
    item_id: str
    output_index: int
    text: str = ""
    name: str = ""
    call_id: str = ""
    tool_index: int | None = None


ERROR_CODES: Final[dict[str, str]] = {"invalid_request_error": "invalid_prompt", "rate_limit": "rate_limit_exceeded"}
"""Stored error types whose OpenAI ``ResponseError.code`` is not ``server_error``."""


class ResponseRenderer:
    """One response's events and object, from its stored events in order (see the module's docstring)."""

    def __init__(self, meta: RequestMeta, request: ResponsesRequest) -> None:
        self.meta = meta
        self.request = request
        self._tag = meta.request_id.removeprefix("resp_")
        self.next_sequence = 0
        self.output: list[ResponseOutputItem] = []
        self._open: _OpenItem | None = None
        self.status: Literal["in_progress", "completed", "incomplete", "failed", "cancelled"] = "in_progress"
        self.usage: ResponseUsage | None = None
        self.error: ResponseError | None = None
        self.incomplete: IncompleteDetails | None = None

    @property
    def ended(self) -> bool:
        return self.status != "in_progress"

    # -- the object

    def response(self, status: str | None = None) -> Response:
        """The response object as it stands (``status`` overrides it: ``queued`` before any event)."""
        request = self.request
        output = list(self.output)
        if self._open is not None:
            output.append(self._item(self._open, "in_progress"))
        text = ResponseTextConfig.model_validate(
            request.text.model_dump(mode="json", by_alias=True, exclude_unset=True)
            if request.text is not None and request.text.format is not None
            else {"format": {"type": "text"}}
        )
        return Response(
            id=self.meta.request_id,
            object="response",
            created_at=self.meta.created_s,
            model=self.meta.model,
            status=status or self.status,  # type: ignore[arg-type]
            output=output,
            error=self.error,
            incomplete_details=self.incomplete,
            instructions=request.instructions,
            metadata=request.metadata or {},
            temperature=request.temperature,
            top_p=request.top_p,
            max_output_tokens=request.max_output_tokens,
            previous_response_id=request.previous_response_id,
            parallel_tool_calls=request.parallel_tool_calls if request.parallel_tool_calls is not None else True,
            tool_choice=request.tool_choice.model_dump(mode="json")  # type: ignore[arg-type]
            if isinstance(request.tool_choice, NamedFunctionChoice)
            else request.tool_choice or "auto",
            tools=[FunctionTool.model_validate(dump_tool) for dump_tool in self._tools()],
            reasoning=Reasoning.model_validate(request.reasoning.model_dump(mode="json", exclude_unset=True))
            if request.reasoning is not None
            else None,
            text=text,
            background=request.background,
            user=request.user,
            usage=self.usage,
        )

    def _tools(self) -> list[dict[str, Any]]:
        known = set(FUNCTION_FIELDS | {"type"})
        return [tool.model_dump(mode="json", exclude_unset=True, include=known) for tool in self.request.tools or ()]

    # -- events

    def _next(self) -> int:
        sequence = self.next_sequence
        self.next_sequence += 1
        return sequence

    def start(self) -> list[ResponseStreamEvent]:
        """The first two events (sequence numbers 0 and 1), before any stored event, as vLLM sends them."""
        initial = self.response("in_progress")
        return [
            ResponseCreatedEvent(type="response.created", sequence_number=self._next(), response=initial),
            ResponseInProgressEvent(type="response.in_progress", sequence_number=self._next(), response=initial),
        ]

    def feed(self, event: wire.Event) -> list[ResponseStreamEvent]:
        """The events one stored event adds (none for a handover: transports show it their own way)."""
        if event.kind == "handover" or self.ended:
            return []
        if event.kind == "delta":
            out: list[ResponseStreamEvent] = []
            if event.reasoning:
                out += self._piece("reasoning", event.reasoning)
            if event.text:
                out += self._piece("message", event.text)
            if event.tool_calls:
                for group in _tool_call_groups(event.tool_calls):
                    out += self._tool_piece(group)
            return out
        out = self._close("completed" if event.kind == "end" else "incomplete")
        if event.kind == "end":
            self.usage = ResponseUsage(
                input_tokens=event.prompt_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
                output_tokens=event.completion_tokens,
                # vLLM counts them with its parser (the worker stored its count; none without a parser: 0).
                output_tokens_details=OutputTokensDetails(reasoning_tokens=event.reasoning_tokens or 0),
                total_tokens=event.prompt_tokens + event.completion_tokens,
            )
            if event.finish_reason == "length":
                self.status = "incomplete"
                self.incomplete = IncompleteDetails(reason="max_output_tokens")
                out.append(
                    ResponseIncompleteEvent(
                        type="response.incomplete", sequence_number=self._next(), response=self.response()
                    )
                )
            else:
                self.status = "completed"
                out.append(
                    ResponseCompletedEvent(
                        type="response.completed", sequence_number=self._next(), response=self.response()
                    )
                )
            return out
        if event.error_type == "cancelled":
            # The stream API has no cancelled event: a cancelled response ends as incomplete, with its status.
            self.status = "cancelled"
            out.append(
                ResponseIncompleteEvent(
                    type="response.incomplete", sequence_number=self._next(), response=self.response()
                )
            )
            return out
        self.status = "failed"
        self.error = ResponseError(
            code=ERROR_CODES.get(event.error_type, "server_error"),  # type: ignore[arg-type]
            message=event.message or event.error_type,
        )
        out.append(ResponseFailedEvent(type="response.failed", sequence_number=self._next(), response=self.response()))
        return out

    def _piece(self, kind: Literal["message", "reasoning"], text: str) -> list[ResponseStreamEvent]:
        out: list[ResponseStreamEvent] = []
        current = self._open
        if current is None or current.kind != kind:
            out += self._close("completed")
            current = self._open = _OpenItem(kind, self._item_id(kind), len(self.output))
            out.append(
                ResponseOutputItemAddedEvent(
                    type="response.output_item.added",
                    sequence_number=self._next(),
                    output_index=current.output_index,
                    item=self._item(current, "in_progress", added=True),
                )
            )
            part: Any = (
                ResponseOutputText(type="output_text", text="", annotations=[], logprobs=[])
                if kind == "message"
                else {"type": "reasoning_text", "text": ""}
            )
            out.append(
                ResponseContentPartAddedEvent(
                    type="response.content_part.added",
                    **self._at(current),
                    content_index=0,
                    part=part,
                )
            )
        current.text += text
        if kind == "message":
            out.append(
                ResponseTextDeltaEvent(
                    type="response.output_text.delta",
                    **self._at(current),
                    content_index=0,
                    delta=text,
                    logprobs=[],
                )
            )
        else:
            out.append(
                ResponseReasoningTextDeltaEvent(
                    type="response.reasoning_text.delta",
                    **self._at(current),
                    content_index=0,
                    delta=text,
                )
            )
        return out

    def _tool_piece(self, group: list[dict[str, Any]]) -> list[ResponseStreamEvent]:
        first = group[0]
        function = first.get("function")
        if function is None:
            return []
        out: list[ResponseStreamEvent] = []
        current = self._open
        index = first.get("index")
        if current is None or current.kind != "function_call" or (index is not None and current.tool_index != index):
            out += self._close("completed")
            output_index = len(self.output)
            current = self._open = _OpenItem(
                "function_call",
                self._item_id("function_call"),
                output_index,
                name=function.get("name") or "",
                call_id=first.get("id") or f"call_{self._tag}_{output_index}",
                tool_index=index,
            )
            out.append(
                ResponseOutputItemAddedEvent(
                    type="response.output_item.added",
                    sequence_number=self._next(),
                    output_index=current.output_index,
                    item=self._item(current, "in_progress"),
                )
            )
        arguments = "".join((call.get("function") or {}).get("arguments") or "" for call in group)
        if arguments:
            current.text += arguments
            out.append(
                ResponseFunctionCallArgumentsDeltaEvent(
                    type="response.function_call_arguments.delta",
                    **self._at(current),
                    delta=arguments,
                )
            )
        return out

    def _close(self, status: Literal["completed", "incomplete"]) -> list[ResponseStreamEvent]:
        """The ``done`` events of the item being streamed, if any; it joins the output."""
        current, self._open = self._open, None
        if current is None:
            return []
        out: list[ResponseStreamEvent] = []
        item = self._item(current, status)
        if current.kind == "message":
            part = ResponseOutputText(type="output_text", text=current.text, annotations=[], logprobs=None)
            out.append(
                ResponseTextDoneEvent(
                    type="response.output_text.done",
                    **self._at(current),
                    content_index=0,
                    text=current.text,
                    logprobs=[],
                )
            )
            out.append(self._part_done(current, part))
        elif current.kind == "reasoning":
            out.append(
                ResponseReasoningTextDoneEvent(
                    type="response.reasoning_text.done",
                    **self._at(current),
                    content_index=0,
                    text=current.text,
                )
            )
            out.append(self._part_done(current, {"type": "reasoning_text", "text": current.text}))
        else:
            out.append(
                ResponseFunctionCallArgumentsDoneEvent(
                    type="response.function_call_arguments.done",
                    **self._at(current),
                    arguments=current.text,
                )
            )
        out.append(
            ResponseOutputItemDoneEvent(
                type="response.output_item.done",
                sequence_number=self._next(),
                output_index=current.output_index,
                item=item,
            )
        )
        self.output.append(item)
        return out

    def _at(self, current: _OpenItem) -> dict[str, Any]:
        """Where an event of the streamed item stands: the next sequence number, the item and its place."""
        return {"sequence_number": self._next(), "output_index": current.output_index, "item_id": current.item_id}

    def _part_done(self, current: _OpenItem, part: Any) -> ResponseContentPartDoneEvent:
        return ResponseContentPartDoneEvent(
            type="response.content_part.done",
            **self._at(current),
            content_index=0,
            part=part,
        )

    def _item_id(self, kind: str) -> str:
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc"}[kind]
        return f"{prefix}_{self._tag}_{len(self.output)}"

    def _item(
        self, current: _OpenItem, status: Literal["in_progress", "completed", "incomplete"], *, added: bool = False
    ) -> ResponseOutputItem:
        if current.kind == "message":
            content: list[Any] = (
                []
                if added or not current.text
                else [ResponseOutputText(type="output_text", text=current.text, annotations=[], logprobs=None)]
            )
            return ResponseOutputMessage(
                type="message", id=current.item_id, role="assistant", status=status, content=content
            )
        if current.kind == "reasoning":
            reasoning = [ReasoningContent(type="reasoning_text", text=current.text)] if current.text else None
            return ResponseReasoningItem(
                type="reasoning", id=current.item_id, summary=[], content=reasoning, status=status
            )
        return ResponseFunctionToolCall(
            type="function_call",
            id=current.item_id,
            call_id=current.call_id,
            name=current.name,
            arguments=current.text,
            status=status,
        )

    def frames(self, events: list[ResponseStreamEvent], after: int) -> bytes:
        """The SSE frames of the events numbered above ``after`` (a resume's ``starting_after``)."""
        return b"".join(event_frame(event) for event in events if event.sequence_number > after)


def _tool_call_groups(stored: str) -> list[list[dict[str, Any]]]:
    """A delta's stored tool-call pieces grouped by call index, in order (as vLLM's ``split_delta``)."""
    calls = json.loads(stored)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for call in calls:
        groups.setdefault(call.get("index"), []).append(call)
    return list(groups.values())


def output_items(renderer: ResponseRenderer) -> list[dict[str, Any]]:
    """A finished response's output as input items (what ``previous_response_id`` continues from)."""
    return [dump(item) for item in renderer.output]
