"""The chat page in a real headless Chromium against real gateways and a sim worker: it streams, it survives
its gateway being killed mid-reply (resuming on a new gateway with Last-Event-ID), it stops, it shows errors."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from playwright.sync_api import Browser, Page, Response, sync_playwright

from tests.support import Cluster, Gateway, Worker, chat_body, content_of, read_stream

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ITL_MS = 50
STATE = "document.getElementById('status').dataset.state"
# Waits are written as functions: the page's Content-Security-Policy forbids evaluating bare expression strings.
ENDED = f"() => ['done', 'error', 'cancelled'].includes({STATE})"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: the test command (make test) installs Debian's 'chromium'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context per test; an uncaught script error anywhere in it fails the test."""
    context = browser.new_context(viewport={"width": 900, "height": 700})
    page = context.new_page()
    page.set_default_timeout(30_000)
    script_errors: list[str] = []
    page.on("pageerror", lambda exc: script_errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not script_errors, f"the page threw: {script_errors}"


@pytest.fixture(scope="module")
def worker(cluster: Cluster) -> Worker:
    return cluster.worker(sim_itl_ms=ITL_MS, sim_ttft_ms=50, sim_fail_marker="BREAK")


@pytest.fixture(scope="module")
def gateway(cluster: Cluster, worker: Worker) -> Gateway:
    return cluster.gateway()


def open_chat(page: Page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_function("() => document.getElementById('model').dataset.loaded === 'true'")


def ask(page: Page, prompt: str, *, max_tokens: int | str, model: str | None = None) -> None:
    if model is not None:
        page.fill("#model", model)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", prompt)
    page.click("#send")


def wait_until_ended(page: Page, timeout_ms: float = 30_000) -> str:
    page.wait_for_function(ENDED, timeout=timeout_ms)
    return page.get_attribute("#status", "data-state") or ""


def stored_reply(url: str, request_id: str) -> tuple[str, str | None]:
    """(the reply text, the last event id) of a request as Redis has it, replayed from the start."""
    replay = read_stream("GET", f"{url}/v1/requests/{request_id}/events")
    assert replay.events[-1].data == "[DONE]"
    return content_of(replay.events), replay.events[-2].id


def reply_of(page: Page) -> str:
    return page.text_content("#reply") or ""


def test_a_reply_streams_into_the_page_with_its_timing_and_matches_the_stored_events(
    page: Page, gateway: Gateway
) -> None:
    open_chat(page, gateway.url)
    ask(page, "stream into the page", max_tokens=40)
    partial = page.wait_for_function(
        """() => {
            const text = document.getElementById('reply')?.textContent ?? '';
            const state = document.getElementById('status').dataset.state;
            return text.length > 0 && state === 'streaming' ? text : null;
        }"""
    ).json_value()
    assert 0 < len(partial.split()) < 40, "the reply appeared all at once, not as it was generated"

    assert wait_until_ended(page) == "done", page.text_content("#error")
    request_id = page.get_attribute("#reply", "data-request-id") or ""
    assert page.get_attribute("#request-id", "data-request-id") == request_id
    text, last_event_id = stored_reply(gateway.url, request_id)
    assert reply_of(page) == text
    assert len(text.split()) == 40
    assert page.get_attribute("#reply", "data-last-event-id") == last_event_id
    assert (page.text_content("#status") or "").strip() == "done"

    ttft_ms = float(page.get_attribute("#ttft", "data-ms") or "nan")
    assert 0 < ttft_ms < 10_000 and (page.text_content("#ttft") or "").endswith(" ms")
    tokens_per_s = float(page.get_attribute("#tps", "data-value") or "nan")
    # The sim steps every 50 ms: at most 20 tokens/s, give or take the timing of the first chunk.
    assert 2 < tokens_per_s < 2 * 1000 / ITL_MS, tokens_per_s
    # The text is the rate to one decimal; data-value is the same rate to two, so compare within the rounding
    # (20.0496 shows "20.0" and carries "20.05", which Python rounds to 20.1).
    shown = page.text_content("#tps") or ""
    assert re.fullmatch(r"\d+\.\d", shown) and abs(float(shown) - tokens_per_s) <= 0.05 + 1e-9, (shown, tokens_per_s)


def test_the_page_finishes_the_reply_through_a_new_gateway_after_its_gateway_is_killed(
    page: Page, cluster: Cluster, worker: Worker, tmp_path: Path
) -> None:
    doomed = cluster.gateway()
    port = urlparse(doomed.url).port
    open_chat(page, doomed.url)
    ask(page, "survive a dead gateway", max_tokens=80)
    page.wait_for_function(
        "() => (document.getElementById('reply')?.textContent.split(/\\s+/).filter(Boolean).length ?? 0) >= 8"
    )
    doomed.proc.kill()
    page.wait_for_function(f"() => ['reconnecting', 'done', 'error', 'cancelled'].includes({STATE})")
    assert "reconnecting…" in (page.text_content("#status") or ""), "the page did not notice the dropped stream"

    replacement = cluster.gateway(port=port)
    page.wait_for_function(f"() => ['resumed', 'done', 'error'].includes({STATE})")
    state = wait_until_ended(page)
    shot = tmp_path / "browser-resume.png"
    page.screenshot(path=str(shot), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "browser-resume.png")

    assert state == "done", page.text_content("#error")
    assert int(page.get_attribute("#status", "data-resumes") or "0") >= 1
    assert "resumed" in (page.text_content("#status") or "")
    request_id = page.get_attribute("#reply", "data-request-id") or ""
    text, last_event_id = stored_reply(replacement.url, request_id)
    assert reply_of(page) == text, "the page lost or repeated part of the reply"
    assert len(reply_of(page).split()) == 80
    assert page.get_attribute("#reply", "data-last-event-id") == last_event_id
    assert page.get_attribute("#reply", "data-duplicates") is None, "the resume replayed events the page had"


def test_the_stop_button_cancels_the_request(page: Page, gateway: Gateway) -> None:
    open_chat(page, gateway.url)
    ask(page, "a long answer to stop", max_tokens=400)
    page.wait_for_function("() => document.getElementById('reply')?.textContent.length > 0")
    page.click("#stop")
    assert wait_until_ended(page) == "cancelled", page.text_content("#error")
    request_id = page.get_attribute("#reply", "data-request-id") or ""
    status = httpx.get(f"{gateway.url}/v1/requests/{request_id}").json()
    assert status["state"] == "cancelled" and status["cancel_requested"] is True
    assert len(reply_of(page).split()) < 400
    assert page.is_hidden("#error")


@pytest.mark.parametrize(
    ("model", "max_tokens", "prompt", "shown", "accepted"),
    [
        ("no-such-model", 5, "hello", "model_not_found: the model 'no-such-model' does not exist", False),
        (None, 0, "hello", "400: max_tokens must be at least 1, got 0", False),  # vLLM's own refusal
        (None, 20, "please BREAK now", "engine_error: simulated engine failure", True),
    ],
    ids=["unknown-model", "invalid-parameter", "error-event-mid-stream"],
)
def test_the_page_shows_the_error_of_a_refused_or_failed_request(
    page: Page, gateway: Gateway, model: str | None, max_tokens: int, prompt: str, shown: str, accepted: bool
) -> None:
    open_chat(page, gateway.url)
    ask(page, prompt, max_tokens=max_tokens, model=model)
    assert wait_until_ended(page) == "error"
    assert page.is_visible("#error")
    assert shown in (page.text_content("#error") or "")
    assert (page.get_attribute("#request-id", "data-request-id") is not None) == accepted
    assert page.is_enabled("#send") and page.is_disabled("#stop")


def test_on_a_gateway_with_keys_the_page_asks_for_one_keeps_it_in_the_tab_and_sends_it(
    page: Page, cluster: Cluster, worker: Worker
) -> None:
    key = "sk-browser-0123456789abcdef"
    keyed = cluster.gateway(api_keys=f"browser:{key}")
    page.goto(keyed.url + "/")
    page.wait_for_function("() => !document.getElementById('error').hidden")
    assert "missing_api_key" in (page.text_content("#error") or "")
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => document.getElementById('model').dataset.loaded === 'true'")
    ask(page, "hello with a key", max_tokens=6)
    assert wait_until_ended(page) == "done"
    request_id = page.get_attribute("#reply", "data-request-id") or ""
    stored = read_stream(
        "GET", f"{keyed.url}/v1/requests/{request_id}/events", headers={"Authorization": f"Bearer {key}"}
    )
    assert content_of(stored.events) == reply_of(page)
    # the key lives in this tab's session storage only, and survives a reload of the tab
    assert page.evaluate("() => sessionStorage.getItem('tokenspool.apiKey')") == key
    assert page.evaluate("() => localStorage.length + document.cookie.length") == 0
    page.reload()
    page.wait_for_function("() => document.getElementById('model').dataset.loaded === 'true'")
    assert page.input_value("#api-key") == key


EVENT_SOURCE_UNTIL_CLOSED = """async (url) => {
    const source = new EventSource(url);
    const messages = [];
    let opens = 0;
    await new Promise((resolve) => {
        source.onopen = () => { opens += 1; };
        source.onmessage = (event) => { messages.push({ id: event.lastEventId, data: event.data }); };
        source.onerror = () => { if (source.readyState === EventSource.CLOSED) resolve(); };
    });
    return { messages, opens, state: source.readyState };
}"""


@pytest.mark.parametrize("what", ["simple-stream", "finished-request"])
def test_a_native_eventsource_stops_after_the_204_that_answers_its_reconnect_after_the_end(
    page: Page, gateway: Gateway, what: str
) -> None:
    if what == "simple-stream":  # a new request, streamed live in the seed document's GET form
        path = "/v1/chat/completions/stream?prompt=hello%20eventsource&max_tokens=4&model=tokenspool-sim"
    else:  # the replay of a chat request that has ended (without usage: [DONE] carries the last id)
        done = read_stream("POST", gateway.url + "/v1/chat/completions", json=chat_body("finished", max_tokens=3))
        path = f"/v1/requests/{done.headers['x-request-id'] if done.headers else ''}/events"
    responses: list[Response] = []
    page.on("response", lambda response: responses.append(response) if response.url == gateway.url + path else None)
    page.goto(gateway.url + "/")
    seen = page.evaluate(EVENT_SOURCE_UNTIL_CLOSED, path)

    assert seen["state"] == 2, "the EventSource did not close"  # EventSource.CLOSED
    assert seen["opens"] == 1, "the EventSource opened a second stream"
    data = [message["data"] for message in seen["messages"]]
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1, "the end was delivered again"
    ids = [message["id"] for message in seen["messages"]]
    last_id = ids[-1]
    # the request's last event: the simple form's done event (5, after 4 tokens), or the end event that only
    # [DONE] carries (4, after 3 deltas)
    assert last_id.rpartition(":")[2] == ("5" if what == "simple-stream" else "4"), ids
    # one stream (200), then one reconnect from the request's last event, answered 204
    exchanges = [(response.request.all_headers().get("last-event-id"), response.status) for response in responses]
    assert exchanges == [(None, 200), (last_id, 204)], exchanges
