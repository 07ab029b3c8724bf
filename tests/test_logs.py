"""Logs: JSON lines about a request carry its id; prompts and outputs stay out unless asked for."""

from __future__ import annotations

import json
from typing import Any

from tests.support import Cluster, Proc, chat_body, content_of, read_stream, wait_for, wait_for_model

SECRET = "zebra-passphrase-4417"


def json_lines(proc: Proc) -> list[dict[str, Any]]:
    lines = [line for line in proc.log().splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines]


def lines_about(proc: Proc, request_id: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(proc) if request_id in line["message"]]


def test_json_log_lines_about_a_request_carry_its_id_and_never_its_text(cluster: Cluster) -> None:
    worker = cluster.worker(model="quiet", log_format="json", sim_itl_ms=2)
    gateway = cluster.gateway(log_format="json")
    wait_for_model(gateway, "quiet")
    stream = read_stream(
        "POST", gateway.url + "/v1/chat/completions", json=chat_body(f"my {SECRET}", max_tokens=12, model="quiet")
    )
    request_id = stream.headers["x-request-id"] if stream.headers else ""
    output = content_of(stream.events)
    assert len(output) > 20

    def both_logged() -> bool:
        worker_done = any("done" in line["message"] for line in lines_about(worker.proc, request_id))
        return worker_done and any("stream closed" in line["message"] for line in lines_about(gateway.proc, request_id))

    wait_for(both_logged, 10, "the gateway and the worker to log the request")
    for proc in (gateway.proc, worker.proc):
        about = lines_about(proc, request_id)
        assert about and all(line["request_id"] == request_id for line in about)
        assert all(line["level"] in {"debug", "info", "warning", "error"} for line in json_lines(proc))
        text = proc.log()
        assert SECRET not in text
        assert output not in text and output.strip().split(" ", 3)[-1] not in text
    assert any("accepted" in line["message"] for line in lines_about(gateway.proc, request_id))


def test_log_content_setting_logs_prompt_and_output_on_the_worker(cluster: Cluster) -> None:
    worker = cluster.worker(model="chatty", log_format="json", log_content=True, sim_itl_ms=2)
    gateway = cluster.gateway()
    wait_for_model(gateway, "chatty")
    stream = read_stream(
        "POST", gateway.url + "/v1/chat/completions", json=chat_body(f"my {SECRET}", max_tokens=12, model="chatty")
    )
    request_id = stream.headers["x-request-id"] if stream.headers else ""
    output = content_of(stream.events)

    def logged_output() -> bool:
        return any("output:" in line["message"] for line in lines_about(worker.proc, request_id))

    wait_for(logged_output, 10, "the worker to log the output")
    about = lines_about(worker.proc, request_id)
    assert any(SECRET in line["message"] and "prompt:" in line["message"] for line in about)
    assert any(repr(output) in line["message"] for line in about)
