"""Resuming from any event, on any gateway: nothing lost, nothing repeated, and bad positions refused."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support import Cluster, Gateway, Worker, chat_body, content_of, read_stream, wait_for, wait_for_model
from tokenspool.shared import keys

Stack = tuple[list[Gateway], list[Worker]]


@pytest.mark.parametrize("k", [1, 7, 20])
def test_resume_on_another_gateway_gets_exactly_the_rest(stack: Stack, k: int) -> None:
    (gw_a, gw_b), _ = stack
    body = chat_body("resume me", max_tokens=40, seed=k)
    head = read_stream("POST", gw_a.url + "/v1/chat/completions", json=body, limit=k)
    assert len(head.events) == k
    request_id = head.headers["x-request-id"] if head.headers else ""
    tail = read_stream(
        "GET", f"{gw_b.url}/v1/requests/{request_id}/events", headers={"Last-Event-ID": head.events[-1].id or ""}
    )
    ids = [e.id for e in head.events + tail.events[:-1]]
    assert ids == [keys.event_id(request_id, n) for n in range(1, len(ids) + 1)], "gap or duplicate"
    assert tail.events[-1].data == "[DONE]"
    full_replay = read_stream("GET", f"{gw_a.url}/v1/requests/{request_id}/events")
    assert [e.raw for e in head.events + tail.events] == [e.raw for e in full_replay.events]
    uninterrupted = read_stream("POST", gw_b.url + "/v1/chat/completions", json=body)
    assert content_of(head.events + tail.events) == content_of(uninterrupted.events)
    assert len(content_of(uninterrupted.events).split()) == 40


def test_resume_after_completion_and_with_query_parameter(stack: Stack) -> None:
    (gw_a, gw_b), _ = stack
    done = read_stream("POST", gw_a.url + "/v1/chat/completions", json=chat_body("finished", max_tokens=6))
    request_id = done.headers["x-request-id"] if done.headers else ""
    third = done.events[2].id
    by_query = read_stream("GET", f"{gw_b.url}/v1/requests/{request_id}/events?last_event_id={third}")
    assert [e.raw for e in by_query.events] == [e.raw for e in done.events[3:]]
    after_last = read_stream(
        "GET", f"{gw_b.url}/v1/requests/{request_id}/events", headers={"Last-Event-ID": done.events[-2].id or ""}
    )
    assert [e.data for e in after_last.events] == ["[DONE]"]


def test_resume_from_the_last_event_of_a_finished_request_answers_204_at_once(stack: Stack) -> None:
    (gw_a, gw_b), _ = stack
    body = {**chat_body("usage last", max_tokens=4), "stream_options": {"include_usage": True}}
    done = read_stream("POST", gw_a.url + "/v1/chat/completions", json=body)
    final = done.events[-2]
    assert final.json()["usage"] is not None and final.id
    assert done.events[-1].data == "[DONE]" and done.events[-1].id is None, "the usage chunk had the last id"
    request_id = done.headers["x-request-id"] if done.headers else ""
    url = f"{gw_b.url}/v1/requests/{request_id}/events"
    started = time.monotonic()
    after_final = httpx.get(url, headers={"Last-Event-ID": final.id}, timeout=10)
    assert after_final.status_code == 204 and after_final.content == b""
    assert after_final.headers["x-request-id"] == request_id
    assert time.monotonic() - started < 5, "the answer waited for events that can never come"
    assert httpx.get(url, params={"last_event_id": final.id}).status_code == 204
    # one event earlier, there is something left: the usage chunk, then [DONE]
    before_final = read_stream("GET", url, headers={"Last-Event-ID": done.events[-3].id or ""})
    assert [e.raw for e in before_final.events] == [e.raw for e in done.events[-2:]]


def test_without_usage_the_done_frame_carries_the_last_event_id(stack: Stack) -> None:
    (gw, _), _ = stack
    done = read_stream("POST", gw.url + "/v1/chat/completions", json=chat_body("no usage", max_tokens=3))
    request_id = done.headers["x-request-id"] if done.headers else ""
    # three deltas (1-3), then the end event (4): it has no frame of its own, so [DONE] carries its id
    assert [e.id for e in done.events] == [keys.event_id(request_id, n) for n in range(1, 5)]
    assert done.events[-1].data == "[DONE]"
    url = f"{gw.url}/v1/requests/{request_id}/events"
    assert httpx.get(url, headers={"Last-Event-ID": done.events[-1].id or ""}).status_code == 204
    replay = read_stream("GET", url)
    assert [e.raw for e in replay.events] == [e.raw for e in done.events]


def test_header_wins_over_query_parameter(stack: Stack) -> None:
    (gw_a, _), _ = stack
    done = read_stream("POST", gw_a.url + "/v1/chat/completions", json=chat_body("header wins", max_tokens=6))
    request_id = done.headers["x-request-id"] if done.headers else ""
    resumed = read_stream(
        "GET",
        f"{gw_a.url}/v1/requests/{request_id}/events?last_event_id={done.events[0].id}",
        headers={"Last-Event-ID": done.events[3].id or ""},
    )
    assert resumed.events[0].id == done.events[4].id


def test_bad_resume_positions_are_refused(stack: Stack) -> None:
    (gw, _), _ = stack
    done = read_stream("POST", gw.url + "/v1/chat/completions", json=chat_body("bad ids", max_tokens=4))
    other = read_stream("POST", gw.url + "/v1/chat/completions", json=chat_body("other", max_tokens=4))
    request_id = done.headers["x-request-id"] if done.headers else ""
    other_id = other.headers["x-request-id"] if other.headers else ""
    url = f"{gw.url}/v1/requests/{request_id}/events"
    cases = {
        "garbage": 400,
        f"{request_id}:99": 400,
        f"{request_id}:-1": 400,
        f"{other_id}:2": 400,
    }
    for last_id, status in cases.items():
        response = httpx.get(url, headers={"Last-Event-ID": last_id})
        assert response.status_code == status, (last_id, response.text)
        assert response.json()["error"]["code"] == "invalid_event_id"
    unknown = httpx.get(f"{gw.url}/v1/requests/{keys.new_request_id('chat')}/events")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "request_not_found"
    assert httpx.get(f"{gw.url}/v1/requests/not-an-id/events").status_code == 404


def test_expired_events_answer_410_then_404_after_the_tombstone(cluster: Cluster, stack: Stack) -> None:
    cluster.worker(model="expiring", retention_s=0.5, tombstone_s=1.5)
    gw = stack[0][0]
    wait_for_model(gw, "expiring")
    done = read_stream(
        "POST", gw.url + "/v1/chat/completions", json=chat_body("short-lived", max_tokens=3, model="expiring")
    )
    request_id = done.headers["x-request-id"] if done.headers else ""
    url = f"{gw.url}/v1/requests/{request_id}/events"

    def expired() -> bool:
        return httpx.get(url).status_code == 410

    wait_for(expired, 10, "the events to expire")
    gone = httpx.get(url, headers={"Last-Event-ID": done.events[0].id or ""})
    assert gone.status_code == 410 and "expired" in gone.json()["error"]["message"]
    assert httpx.get(f"{gw.url}/v1/requests/{request_id}").json()["state"] == "done"
    wait_for(lambda: httpx.get(url).status_code == 404, 10, "the tombstone to expire")


def test_simple_get_form_streams_tokens_and_resumes_by_query(stack: Stack) -> None:
    (gw_a, gw_b), _ = stack
    url = f"{gw_a.url}/v1/chat/completions/stream?prompt=hello%20there&max_tokens=6&seed=2&model=tokenspool-sim"
    full = read_stream("GET", url)
    datas = [e.json() for e in full.events[:-1]]
    assert all(set(d) == {"token", "done"} and d["done"] is False for d in datas[:-1])
    assert datas[-1]["done"] is True and full.events[-1].data == "[DONE]"
    resumed = read_stream("GET", f"{gw_b.url}/v1/chat/completions/stream?last_event_id={full.events[1].id}")
    assert [e.raw for e in resumed.events] == [e.raw for e in full.events[2:]]
    assert httpx.get(f"{gw_a.url}/v1/chat/completions/stream").status_code == 400


def test_continuous_usage_is_on_every_chunk_and_a_resume_on_another_gateway_replays_it_byte_for_byte(
    stack: Stack,
) -> None:
    """What guidellm asks for: ``include_usage`` with ``continuous_usage_stats``, as ``vllm serve`` answers it."""
    (gw_a, gw_b), _ = stack
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = chat_body("count as you go", max_tokens=12, stream_options=options)
    live = read_stream("POST", gw_a.url + "/v1/chat/completions", json=body)
    request_id = live.headers["x-request-id"] if live.headers else ""
    chunks = [e.json() for e in live.opening + live.events if e.data != "[DONE]"]
    usages = [c["usage"] for c in chunks]
    prompt_tokens = usages[0]["prompt_tokens"]
    assert prompt_tokens > 0 and usages[0]["completion_tokens"] == 0, "the role chunk counts the prompt only"
    so_far = [u["completion_tokens"] for u in usages]
    assert so_far == sorted(so_far) and so_far[-1] == 12, "cumulative, ending at the final count"
    assert all(u["prompt_tokens"] == prompt_tokens for u in usages)
    assert all(u["total_tokens"] == prompt_tokens + u["completion_tokens"] for u in usages)
    assert chunks[-1]["choices"] == [] and len(chunks) == 1 + 12 + 1, "role, one chunk per token, usage"
    middle = live.events[5].id or ""
    resumed = read_stream("GET", f"{gw_b.url}/v1/requests/{request_id}/events", headers={"Last-Event-ID": middle})
    assert [e.raw for e in resumed.events] == [e.raw for e in live.events[6:]]
    replay = read_stream("GET", f"{gw_b.url}/v1/requests/{request_id}/events")
    assert [e.raw for e in replay.opening + replay.events] == [e.raw for e in live.opening + live.events]
    plain = read_stream("POST", gw_b.url + "/v1/chat/completions", json=chat_body("count as you go", max_tokens=12))
    assert all(b"usage" not in e.raw for e in plain.opening + plain.events), "only when asked"
