"""Metrics are scraped after real traffic and their values checked, not just their names."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Cluster, chat_body, read_stream, wait_for_model
from tokenspool.redis_server import free_port


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url).text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_gateway_and_worker_metrics_count_real_traffic(cluster: Cluster) -> None:
    port = free_port()
    cluster.worker(model="metered", metrics_port=port, sim_itl_ms=5)
    gateway = cluster.gateway()
    wait_for_model(gateway, "metered")
    streams = [
        read_stream(
            "POST", gateway.url + "/v1/chat/completions", json=chat_body(f"m{i}", max_tokens=5, model="metered")
        )
        for i in range(3)
    ]
    plain = httpx.post(
        gateway.url + "/v1/chat/completions", json=chat_body(max_tokens=5, model="metered", stream=False)
    )
    assert plain.status_code == 200
    assert httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(model="metered", n=3)).status_code == 400
    first = streams[0]
    request_id = first.headers["x-request-id"] if first.headers else ""
    read_stream(
        "GET", f"{gateway.url}/v1/requests/{request_id}/events", headers={"Last-Event-ID": first.events[1].id or ""}
    )

    g = scrape(gateway.url + "/metrics")
    route = (("route", "/v1/chat/completions"),)
    assert g[("tokenspool_gateway_responses_total", (*route, ("status", "200")))] == 4
    assert g[("tokenspool_gateway_responses_total", (*route, ("status", "400")))] == 1
    assert g[("tokenspool_gateway_time_to_first_token_seconds_count", ())] == 3
    assert 0 < g[("tokenspool_gateway_time_to_first_token_seconds_sum", ())] < 30
    assert g[("tokenspool_gateway_resume_time_to_first_event_seconds_count", ())] == 1
    assert g[("tokenspool_gateway_resumes_total", ())] == 1
    assert g[("tokenspool_gateway_streams_ended_total", (("how", "done"),))] == 4
    assert g[("tokenspool_gateway_streams_active", ())] == 0
    assert g[("tokenspool_gateway_time_per_output_token_seconds_count", ())] == 4
    assert g[("tokenspool_gateway_replayed_events_total", ())] >= 3  # the resume replayed from Redis
    # The resume came after event 2 of a stored stream of 6 (5 deltas and the end marker): 4 to replay.
    assert g[("tokenspool_gateway_resume_backlog_events_count", ())] == 1
    assert g[("tokenspool_gateway_resume_backlog_events_sum", ())] == 4
    assert g[("tokenspool_gateway_errors_total", (("code", "invalid_value"), ("status", "400")))] == 1
    assert g.get(("tokenspool_gateway_handovers_total", ()), 0) == 0

    w = scrape(f"http://127.0.0.1:{port}/metrics")
    assert w[("tokenspool_worker_output_tokens_total", ())] == 20
    assert w[("tokenspool_worker_requests_total", (("outcome", "done"),))] == 4
    assert w[("tokenspool_worker_queue_wait_seconds_count", ())] == 4
    assert w[("tokenspool_worker_capacity", ())] == 64
    assert w[("tokenspool_worker_redis_write_seconds_count", ())] >= 1
    assert w[("tokenspool_worker_claims_total", ())] == 4
    assert w[("tokenspool_worker_takeovers_total", ())] == 0
    assert w[("tokenspool_worker_engine_step_seconds_count", ())] >= 20  # one step per token at least


def test_gateways_sharing_a_metrics_directory_each_report_the_traffic_of_all(cluster: Cluster, tmp_path: Path) -> None:
    """What `tokenspool up --gateways N` relies on: whichever process a scrape reaches reports every process."""
    shared_dir = str(tmp_path / "gateway-metrics")
    cluster.worker(model="pooled", sim_itl_ms=2)
    first = cluster.gateway(metrics_multiproc_dir=shared_dir)
    second = cluster.gateway(metrics_multiproc_dir=shared_dir)
    wait_for_model(second, "pooled")
    for gateway, count in ((first, 3), (second, 2)):
        for i in range(count):
            body = chat_body(f"p{i}", max_tokens=3, model="pooled")
            assert read_stream("POST", gateway.url + "/v1/chat/completions", json=body).events[-1].data == "[DONE]"
    route_ok = ("tokenspool_gateway_responses_total", (("route", "/v1/chat/completions"), ("status", "200")))
    for gateway in (first, second):
        samples = scrape(gateway.url + "/metrics")
        assert samples[route_ok] == 5
        assert samples[("tokenspool_gateway_time_to_first_token_seconds_count", ())] == 5
        assert samples[("tokenspool_gateway_streams_active", ())] == 0
