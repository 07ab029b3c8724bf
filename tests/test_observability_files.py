"""The Prometheus config, alert rules and Grafana dashboard under ops/ are checked by the real promtool, and every
metric they query is looked up in what a real gateway and worker expose after real traffic."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Cluster, chat_body, read_stream, wait_for_model
from tokenspool.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
PROMTOOL = ROOT / ".cache" / "tools" / "promtool"
PROMETHEUS = ROOT / "ops" / "prometheus"
GRAFANA = ROOT / "ops" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tokenspool.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "tokenspool.yml"
# Where compose mounts ops/grafana/dashboards in the Grafana container.
DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"

# Labels Prometheus attaches to every scraped series itself; `up` is the series it writes per target.
TARGET_LABELS = {"job", "instance"}
SYNTHETIC_SERIES = {"up"}
GRAFANA_RANGES = ("$__rate_interval", "$__interval", "$__range")

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
SERIES = re.compile(r"\b(tokenspool_[A-Za-z0-9_]+|up)\b")
SELECTOR = re.compile(r"\b(tokenspool_[A-Za-z0-9_]+|up)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


# -- reading the files -------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(PROMETHEUS / "alerts.yml")["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels folded into a collapsed row
    return panels


def dashboard_exprs() -> dict[str, str]:
    """Every query of the dashboard, keyed by where it is (panel title and refId)."""
    return {
        f"dashboard panel {panel.get('title')!r} query {target.get('refId')}": target["expr"]
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if target.get("expr")
    }


def alert_exprs() -> dict[str, str]:
    return {f"alert {rule['alert']}": rule["expr"] for rule in alert_rules()}


def as_promql(expr: str) -> str:
    """A Grafana query as plain PromQL (Grafana's range variables replaced by a fixed range)."""
    for variable in GRAFANA_RANGES:
        expr = expr.replace(variable, "5m")
    return expr


def series_names(expr: str) -> set[str]:
    return set(SERIES.findall(STRING.sub('""', expr)))


def selector_labels(expr: str) -> list[tuple[str, str, str, str]]:
    """(series, label, operator, value) for every label matcher in a series selector."""
    return [
        (name, label, op, value)
        for name, matchers in SELECTOR.findall(expr)
        for label, op, value in MATCHER.findall(matchers)
    ]


def grouping_labels(expr: str) -> set[str]:
    """Labels named in by/without/on/ignoring clauses."""
    stripped = STRING.sub('""', expr)
    return {label.strip() for group in GROUPING.findall(stripped) for label in group.split(",") if label.strip()}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    if not PROMTOOL.is_file() or not PROMTOOL.stat().st_mode & 0o111:
        pytest.fail(
            f"promtool is not installed at {PROMTOOL}: `sh scripts/dev.sh test` (make test) puts it there "
            "(the static binary out of Debian's prometheus package)"
        )
    return subprocess.run([str(PROMTOOL), *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


# -- promtool ---------------------------------------------------------------------------------------------


def test_promtool_accepts_the_prometheus_config() -> None:
    result = promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", PROMETHEUS / "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rule_unit_tests_pass_in_promtool() -> None:
    result = promtool("test", "rules", PROMETHEUS / "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tested = load_yaml(PROMETHEUS / "alerts.test.yml")["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tested:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - firing == set(), "alerts no test makes fire"
    assert alerts - silent == set(), "alerts no test shows staying quiet"


def test_every_alert_waits_has_a_severity_and_explains_itself() -> None:
    for rule in alert_rules():
        assert rule.get("for"), f"{rule['alert']}: no `for:`, one bad scrape would page"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, rule["alert"]
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool has no PromQL checker of its own: the queries go through it as recording rules."""
    exprs = list(dashboard_exprs().values())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query_{i}", "expr": as_promql(expr)} for i, expr in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


# -- the scrape jobs the expressions select ---------------------------------------------------------------


def test_jobs_named_in_expressions_are_scrape_jobs_of_the_config() -> None:
    jobs = {job["job_name"] for job in load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]}
    assert {"tokenspool-gateway", "tokenspool-worker"} <= jobs
    used: dict[str, str] = {}
    for where, expr in {**alert_exprs(), **dashboard_exprs()}.items():
        for _series, label, op, value in selector_labels(expr):
            if label == "job" and op in {"=", "=~"}:
                for job in value.split("|") if op == "=~" else [value]:
                    used[job] = where
    assert used, "no expression selects a job (the no-live-worker alert should)"
    unknown = {job: where for job, where in used.items() if job not in jobs}
    assert unknown == {}, f"jobs the config does not scrape: {unknown}"


# -- Grafana ----------------------------------------------------------------------------------------------


def test_dashboard_panels_have_titles_and_queries_on_the_provisioned_datasource() -> None:
    datasources = load_yaml(DATASOURCES)["datasources"]
    assert len(datasources) == 1 and datasources[0]["type"] == "prometheus"
    uid = datasources[0]["uid"]
    board = dashboard()
    assert board.get("uid") and board.get("title")
    panels = dashboard_panels()
    assert len(panels) >= 10
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        title = panel.get("title")
        assert title, f"panel {panel.get('id')} has no title"
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr") for t in targets), f"panel {title!r}: a target without a query"
        for source in [panel.get("datasource"), *(t.get("datasource") for t in targets)]:
            assert source == {"type": "prometheus", "uid": uid}, f"panel {title!r}: datasource {source}"
        refs = [t.get("refId") for t in targets]
        assert all(refs) and len(refs) == len(set(refs)), f"panel {title!r}: refIds {refs}"


def test_dashboard_covers_latency_traffic_workers_and_errors() -> None:
    used = set().union(*map(series_names, dashboard_exprs().values()))
    for series in [
        "tokenspool_gateway_time_to_first_token_seconds_bucket",
        "tokenspool_gateway_time_per_output_token_seconds_bucket",
        "tokenspool_gateway_streams_active",
        "tokenspool_gateway_streams_ended_total",
        "tokenspool_worker_queue_waiting",
        "tokenspool_worker_queue_wait_seconds_bucket",
        "tokenspool_worker_running_requests",
        "tokenspool_worker_capacity",
        "tokenspool_worker_output_tokens_total",
        "tokenspool_worker_takeovers_total",
        "tokenspool_worker_migrations_total",
        "tokenspool_worker_redis_write_seconds_bucket",
        "tokenspool_gateway_responses_total",
        "tokenspool_gateway_errors_total",
    ]:
        assert series in used, f"the dashboard does not show {series}"


def test_grafana_loads_dashboards_from_the_mounted_folder() -> None:
    providers = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert [(p["type"], p["options"]["path"]) for p in providers] == [("file", DASHBOARDS_MOUNT)]


# -- the metrics exist --------------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, set[str]]:
    """Sample name (with _total/_bucket/... as Prometheus stores it) -> the label names it carries."""
    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    return exposed


@pytest.fixture(scope="module")
def exposed(cluster: Cluster) -> dict[str, set[str]]:
    """What one gateway and one sim worker expose after streams, a resume and an error answer (the processes
    belong to the module's cluster, which stops them)."""
    port = free_port()
    cluster.worker(model="observed", metrics_port=port, sim_itl_ms=5, sim_ttft_ms=10)
    gateway = cluster.gateway()
    wait_for_model(gateway, "observed")
    url = gateway.url + "/v1/chat/completions"
    streams = [read_stream("POST", url, json=chat_body(f"o{i}", max_tokens=6, model="observed")) for i in range(2)]
    first = streams[0]
    request_id = first.headers["x-request-id"] if first.headers else ""
    resumed = read_stream(
        "GET", f"{gateway.url}/v1/requests/{request_id}/events", headers={"Last-Event-ID": first.events[1].id or ""}
    )
    assert resumed.events[-1].data == "[DONE]"
    assert httpx.post(url, json=chat_body(model="observed", n=3)).status_code == 400  # an error answer
    gateway_metrics = scrape(gateway.url + "/metrics")
    worker_metrics = scrape(f"http://127.0.0.1:{port}/metrics")
    names = {*gateway_metrics, *worker_metrics}
    return {name: gateway_metrics.get(name, set()) | worker_metrics.get(name, set()) for name in names}


def missing_from(exposed: dict[str, set[str]], exprs: dict[str, str]) -> list[str]:
    """What the expressions query that the exposition lacks: series names, and labels on those series."""
    problems: list[str] = []
    for where, expr in exprs.items():
        names = series_names(expr)
        for name in sorted(names - SYNTHETIC_SERIES):
            if name not in exposed:
                problems.append(f"{where}: {name} is not exposed")
        for name, label, _op, _value in selector_labels(expr):
            if name not in exposed and name not in SYNTHETIC_SERIES:
                continue  # reported above
            known = exposed.get(name, set()) | TARGET_LABELS
            if label not in known:
                problems.append(f"{where}: {name} has no label {label!r} (it has {sorted(known)})")
        carried = set(TARGET_LABELS).union(*(exposed.get(name, set()) for name in names))
        for label in sorted(grouping_labels(expr) - carried):
            problems.append(f"{where}: groups by {label!r}, which none of {sorted(names)} carries")
    return problems


def test_alerts_query_only_metrics_and_labels_a_running_stack_exposes(exposed: dict[str, set[str]]) -> None:
    assert missing_from(exposed, alert_exprs()) == []


def test_dashboard_queries_only_metrics_and_labels_a_running_stack_exposes(exposed: dict[str, set[str]]) -> None:
    assert missing_from(exposed, dashboard_exprs()) == []


def test_metric_check_notices_a_misspelled_series_and_label(exposed: dict[str, set[str]]) -> None:
    """The check above can fail: a wrong name, a wrong label and a wrong grouping are each reported."""
    problems = missing_from(
        exposed,
        {
            "name": "rate(tokenspool_worker_output_token_total[5m])",
            "label": 'sum(rate(tokenspool_worker_requests_total{result="done"}[5m]))',
            "grouping": "sum by (model) (tokenspool_worker_capacity)",
            "fine": 'sum by (outcome) (rate(tokenspool_worker_requests_total{outcome="done",job="w"}[5m]))',
        },
    )
    assert [problem.split(":")[0] for problem in problems] == ["name", "label", "grouping"], problems
