"""The simulated engine (worker/engines/sim.py): deterministic, resumable, honours limits and stop strings."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tests.samples import meta, request_id_with
from tokenspool.gateway.chunks import completion_body
from tokenspool.shared import wire
from tokenspool.shared.settings import load_settings
from tokenspool.worker.engines.base import EngineDelta, EngineError, EngineRequest
from tokenspool.worker.engines.sim import VOCABULARY, SimEngine
from tokenspool.worker.settings import WorkerSettings


def sim_engine(**overrides: str) -> SimEngine:
    return SimEngine(load_settings(WorkerSettings, {}, {"sim_itl_ms": "0", "sim_ttft_ms": "0", **overrides}))


def run_sim(engine: SimEngine, request: EngineRequest) -> list[EngineDelta]:
    async def collect() -> list[EngineDelta]:
        return [delta async for delta in engine.generate(request)]

    return asyncio.run(collect())


def sim_request(
    prompt: str = "Tell me about streams",
    *,
    seed: int | None = 7,
    max_tokens: int | None = None,
    stop: tuple[str, ...] = (),
    emitted: tuple[int, ...] = (),
    kind: str = "completion",
) -> EngineRequest:
    messages = (wire.ChatMessage("user", prompt),) if kind == "chat" else ()
    return EngineRequest(
        request_id=request_id_with("1"),
        kind=kind,
        prompt=prompt if kind == "completion" else "",
        messages=messages,
        sampling=wire.SamplingOptions(max_tokens=max_tokens, seed=seed, stop=stop),
        emitted_token_ids=emitted,
    )


def ids_of(deltas: list[EngineDelta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


def text_of(deltas: list[EngineDelta]) -> str:
    return "".join(delta.text for delta in deltas)


def test_sim_is_deterministic_for_prompt_and_seed() -> None:
    for kind in ("chat", "completion"):
        first = run_sim(sim_engine(), sim_request(kind=kind))
        second = run_sim(sim_engine(), sim_request(kind=kind))
        assert first == second
        assert len(first) >= 1
        assert first[-1].finish_reason == "stop"  # no max_tokens: a natural end
        assert all(d.finish_reason is None for d in first[:-1])
        assert all(len(d.token_ids) == 1 for d in first)
        assert all(d.prompt_tokens == first[0].prompt_tokens >= 1 for d in first)
    base = ids_of(run_sim(sim_engine(), sim_request()))
    assert ids_of(run_sim(sim_engine(), sim_request(seed=8))) != base
    assert ids_of(run_sim(sim_engine(), sim_request("another prompt"))) != base


def test_sim_text_is_words_from_its_vocabulary() -> None:
    deltas = run_sim(sim_engine(), sim_request())
    words = text_of(deltas).split(" ")
    assert words == [VOCABULARY[i] for i in ids_of(deltas)]


def test_sim_natural_length_is_bounded_by_its_default() -> None:
    engine = sim_engine(sim_default_max_tokens="10")
    for seed in range(20):
        deltas = run_sim(engine, sim_request(seed=seed))
        assert 5 <= len(ids_of(deltas)) <= 10
        assert deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 17])
def test_sim_honours_max_tokens_with_finish_reason_length(max_tokens: int) -> None:
    deltas = run_sim(sim_engine(), sim_request(max_tokens=max_tokens))
    assert len(ids_of(deltas)) == max_tokens
    assert deltas[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    # a prefix of the unlimited reply
    full = ids_of(run_sim(sim_engine(), sim_request()))
    assert ids_of(deltas) == full[:max_tokens]


def test_sim_max_tokens_above_its_natural_length_ends_with_stop() -> None:
    deltas = run_sim(sim_engine(sim_default_max_tokens="8"), sim_request(max_tokens=1000))
    assert len(ids_of(deltas)) <= 8
    assert deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize("position", [0, 3, 10])
def test_sim_stops_at_a_stop_string(position: int) -> None:
    full = run_sim(sim_engine(), sim_request(max_tokens=30))
    full_text = text_of(full)
    word = VOCABULARY[ids_of(full)[position]]
    stop = word[1:] if len(word) > 2 else word  # a stop string inside one token
    cut = full_text.find(stop)
    deltas = run_sim(sim_engine(), sim_request(max_tokens=30, stop=("never-generated", stop)))
    assert deltas[-1].finish_reason == "stop"
    assert text_of(deltas) == full_text[:cut]
    assert stop not in text_of(deltas)
    assert len(ids_of(deltas)) <= position + 1


@pytest.mark.parametrize("k", [0, 1, 5, 19, 20])
def test_sim_continuation_yields_exactly_the_remaining_ids(k: int) -> None:
    full = run_sim(sim_engine(), sim_request(max_tokens=20))
    full_ids = ids_of(full)
    rest = run_sim(sim_engine(), sim_request(max_tokens=20, emitted=tuple(full_ids[:k])))
    assert ids_of(rest) == full_ids[k:]
    assert rest[-1].finish_reason == "length"
    if k < len(full_ids):
        assert text_of(full[:k]) + text_of(rest) == text_of(full)


def test_sim_continuation_of_a_natural_end_ends_with_stop() -> None:
    full_ids = ids_of(run_sim(sim_engine(), sim_request()))
    rest = run_sim(sim_engine(), sim_request(emitted=tuple(full_ids)))
    assert ids_of(rest) == []
    assert rest[-1].finish_reason == "stop"


def test_sim_continuation_stops_at_a_stop_string_spanning_the_resume_point() -> None:
    # Uninterrupted, the reply stops at a two-word stop string. An attempt resumed between the two words
    # must stop at the same token, or the resumed stream diverges from the uninterrupted one.
    plain = ids_of(run_sim(sim_engine(), sim_request(max_tokens=30)))
    j = 8
    stop = VOCABULARY[plain[j - 1]] + " " + VOCABULARY[plain[j]]
    uninterrupted = run_sim(sim_engine(), sim_request(max_tokens=30, stop=(stop,)))
    all_ids = ids_of(uninterrupted)
    assert uninterrupted[-1].finish_reason == "stop"
    k = len(all_ids) - 1  # resumed after the first word of the stop string
    resumed = run_sim(sim_engine(), sim_request(max_tokens=30, stop=(stop,), emitted=tuple(all_ids[:k])))
    assert ids_of(resumed) == all_ids[k:]
    assert resumed[-1].finish_reason == "stop"


def test_sim_fail_marker_fails_after_the_first_token() -> None:
    engine = sim_engine(sim_fail_marker="BOOM")
    seen: list[EngineDelta] = []

    async def collect() -> None:
        async for delta in engine.generate(sim_request("please BOOM now", max_tokens=10)):
            seen.append(delta)

    with pytest.raises(EngineError):
        asyncio.run(collect())
    assert len(seen) == 1
    assert engine.running_requests() == 0
    assert len(ids_of(run_sim(engine, sim_request("harmless", max_tokens=10)))) == 10


def test_sim_closing_the_stream_early_frees_its_slot() -> None:
    engine = sim_engine()

    async def take_two() -> int:
        stream = engine.generate(sim_request(max_tokens=50))
        await anext(stream)
        await anext(stream)
        during = engine.running_requests()
        await stream.aclose()  # type: ignore[attr-defined]
        return during

    assert asyncio.run(take_two()) == 1
    assert engine.running_requests() == 0


def test_sim_identity_and_model_name() -> None:
    assert sim_engine().model_name == "tokenspool-sim"
    assert sim_engine(model="m").model_name == "m"
    assert sim_engine(model="m", served_model_name="alias").model_name == "alias"
    engine = sim_engine(max_num_seqs="5")
    assert engine.capacity == 5
    assert "simulated" in engine.owned_by
    assert {"tools", "response_format", "n", "logit_bias"} <= engine.unsupported
    assert "logprobs" not in engine.unsupported


def test_sim_logprobs_are_uniform_and_rendered_as_openai_expects() -> None:
    import math

    engine = sim_engine(sim_itl_ms="0", sim_ttft_ms="0")
    request = EngineRequest("r", "completion", "p", (), wire.SamplingOptions(max_tokens=3, seed=1, logprobs=2))
    deltas = run_sim(engine, request)
    uniform = -math.log(len(VOCABULARY))
    assert [len(d.logprobs) for d in deltas] == [1, 1, 1]
    assert all(d.logprobs[0].logprob == uniform and len(d.logprobs[0].top) == 2 for d in deltas)
    events = [wire.Event("delta", d.text, d.token_ids, logprobs=d.logprobs) for d in deltas]
    assert all(wire.decode(wire.encode(e), wire.Event) == e for e in events)
    offset_events = [
        dataclasses.replace(e, text_offset=sum(len(x.text) for x in events[:i])) for i, e in enumerate(events)
    ]
    body = completion_body(meta("completion"), offset_events, wire.Event("end", finish_reason="length"))
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [d.logprobs[0].token for d in deltas]
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"][1] == len(deltas[0].text)
    chat = completion_body(meta("chat"), offset_events, wire.Event("end", finish_reason="length"))
    content = chat["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == logprobs["tokens"]
    assert all(len(c["top_logprobs"]) == 2 and c["bytes"] == list(c["token"].encode()) for c in content)
    no_logprobs = run_sim(engine, dataclasses.replace(request, sampling=wire.SamplingOptions(max_tokens=3)))
    assert all(d.logprobs == () for d in no_logprobs)


@pytest.mark.parametrize("itl_ms", ["20", "7", "1"])
@pytest.mark.parametrize("clock_s", [100.0, 1234.5, 12345.6, 99_999.9, 543_210.1])
def test_the_step_clock_counts_whole_steps_whatever_the_clock_reads(itl_ms: str, clock_s: float) -> None:
    """Each token comes one step after the last: the boundary at or after step k's time is step k itself, and
    any time inside a step is due at the next. (Adding the step to a float boundary and rounding up landed
    two steps on for a share of clock values: a benchmark's 20 ms engine streamed at 40 ms.)"""
    engine = sim_engine(sim_itl_ms=itl_ms)
    step_s = float(itl_ms) / 1000
    first = engine._first_step_at_or_after(clock_s)
    for k in range(first, first + 2000):
        assert engine._first_step_at_or_after(k * step_s) == k
        assert engine._first_step_at_or_after(k * step_s + step_s / 2) == k + 1
