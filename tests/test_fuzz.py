"""Fuzzing the public HTTP API: schemathesis generates requests from the live gateway's own OpenAPI document
(valid and invalid bodies, queries, headers, path ids) and sends them, with a key, to a real gateway in
front of a real sim worker. Every answer must be something other than a 5xx and conform to the document
(status, content type, error body schema); requests without the key must be refused."""

from __future__ import annotations

import secrets
from collections import Counter
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance

from tests.sse_spec import parse_sse
from tests.support import Cluster
from tokenspool.shared import keys

KEY = "sk-fuzz-" + secrets.token_hex(16)
OTHER_KEY = "sk-fuzz-other-" + secrets.token_hex(16)
MODEL = "tokenspool-sim"
MAX_TOKENS = 16
EXAMPLES_PER_OPERATION = 40


@pytest.fixture(scope="module")
def fuzzed_gateway(cluster: Cluster) -> str:
    # A fast engine and a small max_tokens cap keep every generated stream short.
    cluster.worker(sim_itl_ms=1, sim_ttft_ms=1)
    gateway = cluster.gateway(
        api_keys=f"fuzz:{KEY},other:{OTHER_KEY}", key_max_tokens=MAX_TOKENS, inter_token_timeout_s=10
    )
    return gateway.url


def created_by(url: str, key: str) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    response = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


def steer(case: Any, served: bool, request_id: str | None) -> bool:
    """Point some generated requests at what exists (the served model, a real request id), so the fuzzing
    reaches past "unknown model" and "unknown request" into streaming, status and cancel."""
    if served and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODEL
        for field in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                case.body[field] = MAX_TOKENS
        if "prompt" in case.body and not isinstance(case.body["prompt"], str):
            case.body["prompt"] = "hi"  # the sim engine refuses a list of prompts and token ids (400) by name
    if served and case.query and "model" in case.query:
        case.query["model"] = MODEL
    if request_id is not None and case.path_parameters and "request_id" in case.path_parameters:
        case.path_parameters["request_id"] = request_id
        return True
    return False


def assert_well_formed_stream(body: bytes) -> None:
    """An SSE body, as a browser's EventSource reads it: JSON events, then ``[DONE]``, nothing else. Every id
    is one of ours; events before the first id are vLLM's frames (a plain POST gets no ids at all, and a chat
    stream opens with vLLM's role-only chunks, which have none: ARCHITECTURE.md, "Where event ids go")."""
    events, _comments = parse_sse(body)
    assert events and events[-1].data == "[DONE]", body[-200:]
    for event in events[:-1]:
        assert isinstance(orjson.loads(event.data), dict)
        assert event.last_event_id == "" or keys.parse_event_id(event.last_event_id)


def fuzz(operation: Any, ids: list[str | None], theirs: str, statuses: Counter[tuple[str, int]]) -> None:
    """Send ``EXAMPLES_PER_OPERATION`` generated requests to one operation, checking every answer."""

    @given(case=operation.as_strategy(), served=st.booleans(), request_id=st.sampled_from(ids))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run: a failure reproduces
        suppress_health_check=list(HealthCheck),
    )
    def answers_as_documented(case: Any, served: bool, request_id: str | None) -> None:
        names_a_request = steer(case, served, request_id)
        # Positive data acceptance is left out: a schema-valid body may still name a model nobody serves, or
        # a request id nobody created: 404 is the right answer.
        response = case.call_and_validate(
            headers={"Authorization": f"Bearer {KEY}"}, timeout=20, excluded_checks=[positive_data_acceptance]
        )
        statuses[(operation.label, response.status_code)] += 1
        if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
            assert_well_formed_stream(response.content)
            statuses[("SSE streams checked", 0)] += 1
        if names_a_request and request_id == theirs:
            assert response.status_code in (400, 404), "another key's request must look unknown"

    answers_as_documented()


def test_public_api_answers_every_generated_request_without_a_5xx_and_as_documented(fuzzed_gateway: str) -> None:
    schema = schemathesis.openapi.from_url(fuzzed_gateway + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/requests/{request_id}/events"}
    mine, theirs = created_by(fuzzed_gateway, KEY), created_by(fuzzed_gateway, OTHER_KEY)
    statuses: Counter[tuple[str, int]] = Counter()
    for operation in operations:
        fuzz(operation, [None, mine, theirs, mine.upper(), mine + "\n"], theirs, statuses)
    print(sorted(statuses.items()))
    # the fuzzing reached past validation: streams were served, requests were found and refused
    for label in ("POST /v1/chat/completions", "POST /v1/completions", "GET /v1/requests/{request_id}/events"):
        assert statuses[(label, 200)] and statuses[(label, 400 if label.startswith("POST") else 404)], label
    assert statuses[("SSE streams checked", 0)] >= 2
    assert sum(statuses.values()) >= len(operations) * EXAMPLES_PER_OPERATION // 2
