"""Settings parsing (shared/settings.py): flags over environment over defaults, refusals naming the culprit."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

import pytest

from tokenspool import settings as settings_of
from tokenspool.gateway.settings import GatewaySettings
from tokenspool.shared.settings import (
    CommonSettings,
    SettingsError,
    as_environment,
    flag_name,
    known_env_names,
    load_settings,
)
from tokenspool.worker.settings import WorkerSettings


def test_settings_defaults_when_nothing_is_given() -> None:
    settings = load_settings(GatewaySettings, {})
    assert settings == GatewaySettings()
    assert settings.port == 8000
    assert settings.heartbeat_s == 15.0
    assert settings.redis_url is None


def test_settings_flag_beats_environment_beats_default() -> None:
    env = {"TOKENSPOOL_PORT": "9001", "TOKENSPOOL_HEARTBEAT_S": "2.5", "TOKENSPOOL_LOG_LEVEL": "debug"}
    from_env = load_settings(GatewaySettings, env)
    assert (from_env.port, from_env.heartbeat_s, from_env.log_level) == (9001, 2.5, "debug")
    assert from_env.max_queue_depth == GatewaySettings().max_queue_depth
    both = load_settings(GatewaySettings, env, {"port": "9002", "heartbeat_s": None})
    assert both.port == 9002  # flag wins
    assert both.heartbeat_s == 2.5  # flag not given (None): environment
    assert both.log_level == "debug"


def test_settings_ignore_variables_that_do_not_start_with_the_prefix() -> None:
    assert load_settings(GatewaySettings, {"PORT": "1", "HOME": "/root", "TOKENSPOOLPORT": "5"}) == GatewaySettings()


def test_settings_of_another_process_kind_are_known_not_unknown() -> None:
    # one environment is shared by gateways and workers: a worker variable must not fail a gateway
    settings = settings_of.load(GatewaySettings, {"TOKENSPOOL_ENGINE": "vllm", "TOKENSPOOL_MAX_NUM_SEQS": "8"})
    assert settings == GatewaySettings()
    assert settings_of.load(WorkerSettings, {"TOKENSPOOL_HEARTBEAT_S": "5"}) == WorkerSettings()


def test_a_component_alone_knows_only_its_own_variables_and_those_it_is_told_of() -> None:
    # each component's settings live beside it: without the launcher's list, the other's are unknown
    with pytest.raises(SettingsError, match="unknown setting TOKENSPOOL_ENGINE"):
        load_settings(GatewaySettings, {"TOKENSPOOL_ENGINE": "vllm"})
    told = load_settings(GatewaySettings, {"TOKENSPOOL_ENGINE": "vllm"}, known={"TOKENSPOOL_ENGINE"})
    assert told == GatewaySettings()


def test_settings_worker_id_is_set_by_its_own_flag() -> None:
    assert load_settings(WorkerSettings, {}, {"worker_id": "w-1"}).worker_id == "w-1"
    by_field = {f.name: f for f in dataclasses.fields(WorkerSettings)}
    assert flag_name(by_field["worker_id"]) == "--id"
    assert flag_name(by_field["max_num_seqs"]) == "--max-num-seqs"


@pytest.mark.parametrize(
    ("cls", "name", "raw"),
    [
        (GatewaySettings, "TOKENSPOOL_PORT", "eighty"),
        (GatewaySettings, "TOKENSPOOL_PORT", "80.5"),
        (GatewaySettings, "TOKENSPOOL_PORT", ""),
        (GatewaySettings, "TOKENSPOOL_HEARTBEAT_S", "soon"),
        (GatewaySettings, "TOKENSPOOL_HEARTBEAT_S", "nan"),
        (GatewaySettings, "TOKENSPOOL_HEARTBEAT_S", "inf"),
        (GatewaySettings, "TOKENSPOOL_HEARTBEAT_S", "-inf"),
        (GatewaySettings, "TOKENSPOOL_LOG_LEVEL", "trace"),
        (GatewaySettings, "TOKENSPOOL_LOG_LEVEL", "INFO"),
        (GatewaySettings, "TOKENSPOOL_LOG_FORMAT", "xml"),
        (GatewaySettings, "TOKENSPOOL_FD", "three"),
        (WorkerSettings, "TOKENSPOOL_ENGINE", "tgi"),
        (WorkerSettings, "TOKENSPOOL_ENFORCE_EAGER", "maybe"),
        (WorkerSettings, "TOKENSPOOL_ENFORCE_EAGER", "2"),
        (WorkerSettings, "TOKENSPOOL_MAX_MODEL_LEN", "big"),
        (WorkerSettings, "TOKENSPOOL_GPU_MEMORY_UTILIZATION", "90%"),
        (WorkerSettings, "TOKENSPOOL_ENGINE_CPUS", "first"),
    ],
)
def test_settings_bad_values_raise_naming_the_variable(cls: type[CommonSettings], name: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(name)):
        load_settings(cls, {name: raw})


@pytest.mark.parametrize(
    ("cls", "field", "raw"),
    [
        (GatewaySettings, "port", "x"),
        (GatewaySettings, "heartbeat_s", "nan"),
        (GatewaySettings, "log_level", "loud"),
        (WorkerSettings, "enforce_eager", "perhaps"),
    ],
)
def test_settings_bad_flag_values_raise_naming_the_flag(cls: type[CommonSettings], field: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=re.escape("--" + field.replace("_", "-"))):
        load_settings(cls, {}, {field: raw})


@pytest.mark.parametrize(
    ("cls", "name", "raw"),
    [
        (GatewaySettings, "TOKENSPOOL_PORT", "-1"),
        (GatewaySettings, "TOKENSPOOL_HEARTBEAT_S", "0"),
        (GatewaySettings, "TOKENSPOOL_MAX_BODY_BYTES", "0"),
        (GatewaySettings, "TOKENSPOOL_RETENTION_S", "0"),
        (GatewaySettings, "TOKENSPOOL_RETENTION_S", "-5"),
        (GatewaySettings, "TOKENSPOOL_TOMBSTONE_S", "-0.5"),
        (GatewaySettings, "TOKENSPOOL_WORKER_TTL_S", "0.01"),
        (WorkerSettings, "TOKENSPOOL_MAX_NUM_SEQS", "0"),
        (WorkerSettings, "TOKENSPOOL_MAX_MODEL_LEN", "0"),
        (WorkerSettings, "TOKENSPOOL_SIM_ITL_MS", "-1"),
    ],
)
def test_settings_below_minimum_raise_naming_the_variable(cls: type[CommonSettings], name: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(name)):
        load_settings(cls, {name: raw})


@pytest.mark.parametrize(
    ("cls", "env", "rule"),
    [
        (
            WorkerSettings,
            {"TOKENSPOOL_LEASE_TIMEOUT_S": "1", "TOKENSPOOL_WORKER_HEARTBEAT_S": "1"},
            "TOKENSPOOL_LEASE_TIMEOUT_S (--lease-timeout-s) must be at least 2 times TOKENSPOOL_WORKER_HEARTBEAT_S "
            "(--worker-heartbeat-s), got 1 and 1: a worker renews its leases once per heartbeat",
        ),
        (
            WorkerSettings,
            {"TOKENSPOOL_WORKER_HEARTBEAT_S": "3", "TOKENSPOOL_LEASE_TIMEOUT_S": "6"},
            "TOKENSPOOL_WORKER_TTL_S (--worker-ttl-s) must be at least 2 times TOKENSPOOL_WORKER_HEARTBEAT_S",
        ),
        (
            GatewaySettings,
            {"TOKENSPOOL_REQUEST_TTL_S": "60"},
            "TOKENSPOOL_REQUEST_TTL_S (--request-ttl-s) must be at least TOKENSPOOL_QUEUE_TIMEOUT_S "
            "(--queue-timeout-s), got 60 and 600: a queued request's keys live request_ttl_s",
        ),
    ],
)
def test_settings_that_cannot_work_together_are_refused_with_the_rule(
    cls: type[CommonSettings], env: dict[str, str], rule: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(rule)):
        load_settings(cls, env)


def test_settings_on_the_edge_of_a_rule_are_accepted() -> None:
    worker = load_settings(
        WorkerSettings,
        {"TOKENSPOOL_LEASE_TIMEOUT_S": "0.4", "TOKENSPOOL_WORKER_HEARTBEAT_S": "0.2", "TOKENSPOOL_WORKER_TTL_S": "0.4"},
    )
    assert (worker.lease_timeout_s, worker.worker_ttl_s) == (0.4, 0.4)
    gateway = load_settings(GatewaySettings, {"TOKENSPOOL_REQUEST_TTL_S": "60", "TOKENSPOOL_QUEUE_TIMEOUT_S": "60"})
    assert gateway.request_ttl_s == gateway.queue_timeout_s == 60


def test_settings_minimum_is_inclusive() -> None:
    settings = load_settings(GatewaySettings, {"TOKENSPOOL_PORT": "0", "TOKENSPOOL_RETENTION_S": "0.001"})
    assert (settings.port, settings.retention_s) == (0, 0.001)


def test_settings_minimum_applies_to_flags_too() -> None:
    with pytest.raises(SettingsError, match="TOKENSPOOL_MAX_NUM_SEQS"):
        load_settings(WorkerSettings, {}, {"max_num_seqs": "0"})


@pytest.mark.parametrize("name", ["TOKENSPOOL_PROT", "TOKENSPOOL_", "TOKENSPOOL_REDIS", "TOKENSPOOL_port"])
def test_settings_unknown_variable_raises_naming_it(name: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(name)):
        load_settings(GatewaySettings, {name: "1"})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("off", False),
    ],
)
def test_settings_booleans(raw: str, expected: bool) -> None:
    assert load_settings(WorkerSettings, {"TOKENSPOOL_ENFORCE_EAGER": raw}).enforce_eager is expected


def test_settings_empty_optional_value_means_unset() -> None:
    settings = load_settings(WorkerSettings, {"TOKENSPOOL_MODEL": "", "TOKENSPOOL_MAX_MODEL_LEN": ""})
    assert settings.model is None
    assert settings.max_model_len is None


def test_settings_every_field_has_a_known_variable() -> None:
    names = settings_of.every_env_name()
    assert names == known_env_names(*settings_of.SETTINGS_CLASSES)
    for cls in (GatewaySettings, WorkerSettings):
        for f in dataclasses.fields(cls):
            assert "TOKENSPOOL_" + f.name.upper() in names


# Values for fields whose text is validated beyond its type; every other field gets a generated value.
_CUSTOM_TEXT = {
    "redis_url": "rediss://u:p@example:6380/2",
    "engine_cpus": "0-1,3",
    "engine_args_json": '{"seed": 1, "x": "a b"}',
    "host": "0.0.0.0",
    "api_keys": "alpha:0123456789abcdef-key,sha256:f84b9046dc1ae19fc4f1b17ef561aa2cdf628fe35fedfcc00d8d09bf5c3a692d",
    "cors_origins": "https://app.example.com,http://localhost:5173",
}


def _non_default(cls: type[CommonSettings]) -> CommonSettings:
    """``cls`` with every field changed from its default, so a round trip exercises every variable."""
    hints = typing.get_type_hints(cls)
    flags: dict[str, str | None] = {}
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        base = args[0] if typing.get_origin(annotation) in (typing.Union, types.UnionType) else annotation
        minimum = f.metadata.get("minimum") or 0
        default: Any = f.default
        if f.name in _CUSTOM_TEXT:
            flags[f.name] = _CUSTOM_TEXT[f.name]
        elif typing.get_origin(base) is typing.Literal:
            flags[f.name] = next(str(a) for a in typing.get_args(base) if a != f.default)
        elif base is bool:
            flags[f.name] = "false" if f.default else "true"
        elif base is int:
            flags[f.name] = str(max(int(minimum), (default or 0)) + 3)
        elif base is float:
            flags[f.name] = repr(max(float(minimum), default or 0.0) + 0.3)
        else:
            flags[f.name] = f"custom {f.name} ✓"
    settings = load_settings(cls, {}, flags)
    unchanged = [f.name for f in dataclasses.fields(cls) if getattr(settings, f.name) == f.default]
    assert unchanged == [], f"fields left at their default: {unchanged}"
    return settings


@pytest.mark.parametrize(
    "settings",
    [
        GatewaySettings(),
        WorkerSettings(),
        _non_default(GatewaySettings),
        _non_default(WorkerSettings),
        load_settings(WorkerSettings, {}, {"sim_fail_marker": "  spaced  ", "dtype": "float16", "retention_s": "1e-3"}),
    ],
    ids=["gateway-default", "worker-default", "gateway-custom", "worker-custom", "worker-odd"],
)
def test_as_environment_round_trips_through_load_settings(settings: CommonSettings) -> None:
    env = as_environment(settings)
    assert all(name.startswith("TOKENSPOOL_") for name in env)
    assert all(isinstance(value, str) for value in env.values())
    assert load_settings(type(settings), env) == settings


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TOKENSPOOL_REDIS_URL": "http://127.0.0.1:6379"}, "got http://"),
        ({"TOKENSPOOL_REDIS_URL": "127.0.0.1:6379"}, "redis+cluster://"),
        ({"TOKENSPOOL_REDIS_URL": "redis://h:1", "TOKENSPOOL_REDIS_TLS_CA_FILE": "/ca.pem"}, "not rediss://"),
    ],
)
def test_settings_refuse_a_redis_url_that_cannot_work(environ: dict[str, str], message: str) -> None:
    for cls in (GatewaySettings, WorkerSettings):
        with pytest.raises(SettingsError, match=re.escape(message)) as raised:
            load_settings(cls, environ)
        assert "TOKENSPOOL_REDIS_URL" in str(raised.value)


@pytest.mark.parametrize("cls", [GatewaySettings, WorkerSettings])
def test_waiting_for_replicas_is_refused_on_a_cluster_and_accepted_on_one_primary(cls: type[CommonSettings]) -> None:
    with pytest.raises(SettingsError, match=r"TOKENSPOOL_REDIS_MIN_REPLICAS_ACKED.*not on a Redis Cluster"):
        load_settings(
            cls, {"TOKENSPOOL_REDIS_URL": "redis+cluster://h:7000", "TOKENSPOOL_REDIS_MIN_REPLICAS_ACKED": "1"}
        )
    for url in ("redis://h:6379/0", "redis+sentinel://s1,s2,s3/main"):
        environ = {"TOKENSPOOL_REDIS_URL": url, "TOKENSPOOL_REDIS_MIN_REPLICAS_ACKED": "2"}
        settings = load_settings(cls, {**environ, "TOKENSPOOL_REDIS_REPLICA_ACK_TIMEOUT_MS": "250"})
        assert (settings.redis_min_replicas_acked, settings.redis_replica_ack_timeout_ms) == (2, 250)
    with pytest.raises(SettingsError, match=r"TOKENSPOOL_REDIS_REPLICA_ACK_TIMEOUT_MS.*at least 1"):
        load_settings(cls, {"TOKENSPOOL_REDIS_REPLICA_ACK_TIMEOUT_MS": "0"})


@pytest.mark.parametrize("cls", [CommonSettings, GatewaySettings, WorkerSettings])
def test_every_process_refuses_a_redis_url_it_cannot_use(cls: type[CommonSettings]) -> None:
    with pytest.raises(SettingsError, match="expected a redis://"):
        load_settings(cls, {"TOKENSPOOL_REDIS_URL": "http://127.0.0.1:6379"})
    with pytest.raises(SettingsError, match="not rediss://"):
        load_settings(cls, {"TOKENSPOOL_REDIS_URL": "redis://127.0.0.1:6379", "TOKENSPOOL_REDIS_TLS_CA_FILE": "ca.pem"})
