"""Settings: one frozen object per process, built once at start from flags and ``TOKENSPOOL_*`` variables.

Every field is a setting with an environment variable named ``TOKENSPOOL_<FIELD>`` and a command-line
flag ``--<field-with-dashes>``; a flag beats the environment, which beats the default. Parsing is
strict: a value of the wrong type, out of range or not among the choices, or an unknown
``TOKENSPOOL_*`` variable (a typo would otherwise be ignored silently), raises :class:`SettingsError`
with a message that names the variable. Units are in the names (``_s``, ``_ms``, ``_bytes``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar, Union, get_args, get_origin
from urllib.parse import urlsplit

ENV_PREFIX = "TOKENSPOOL_"


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it and says what was expected."""


def setting(default: Any, help: str, *, minimum: float | None = None, flag: str | None = None) -> Any:
    """A settings field: its default, its help text, an optional lower bound and flag name."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "flag": flag})


REDIS_SCHEMES: Final = {"redis": False, "rediss": False, "redis+cluster": True, "rediss+cluster": True}
"""The Redis URL schemes tokenspool accepts, and whether each means a Redis Cluster."""


def redis_url_problem(url: str, tls_ca_file: str) -> str | None:
    """What is wrong with this Redis URL and CA file together, or None."""
    scheme = urlsplit(url).scheme
    if scheme not in REDIS_SCHEMES:
        shown = scheme + "://" if scheme else "no scheme"
        return f"expected a redis://, rediss://, redis+cluster:// or rediss+cluster:// URL, got {shown}"
    if tls_ca_file and not scheme.startswith("rediss"):
        return "a TLS CA file is set (TOKENSPOOL_REDIS_TLS_CA_FILE) but the URL is not rediss://"
    return None


LogLevel = Literal["debug", "info", "warning", "error"]

MIN_API_KEY_CHARS = 16
_KEY_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HASHED_ENTRY_RE = re.compile(r"(?:([A-Za-z0-9_.-]{1,64}):)?sha256:([0-9a-f]{64})")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A configured API key, known only by its name and the SHA-256 of the key: the key itself is hashed
    while the setting is parsed and never kept, so neither a dump of the settings nor Redis holds it."""

    name: str
    sha256: str

    @property
    def owner(self) -> str:
        """What requests created with this key record as their owner (in Redis): 128 bits of the hash."""
        return self.sha256[:32]

    def entry(self) -> str:
        """The setting text that configures this key again (by its hash)."""
        return f"{self.name}:sha256:{self.sha256}"


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_api_keys(entries: list[str], source: str) -> tuple[ApiKey, ...]:
    """Key entries (``[name:]key`` or ``[name:]sha256:<64 hex>``) as :class:`ApiKey` values.

    A raw key is at least :data:`MIN_API_KEY_CHARS` printable ASCII characters with no space or comma; a
    key containing ``:`` must be given with a name. Errors name the entry by position, never by its text.
    """
    out: list[ApiKey] = []
    for position, raw in enumerate(entries, start=1):
        entry = raw.strip()
        hashed = _HASHED_ENTRY_RE.fullmatch(entry)
        if hashed is not None:
            name, digest = hashed.group(1), hashed.group(2)
        else:
            name, sep, key = entry.partition(":")
            if not sep or _KEY_NAME_RE.fullmatch(name) is None:
                name, key = "", entry
            if len(key) < MIN_API_KEY_CHARS or not all("!" <= ch <= "~" and ch != "," for ch in key):
                raise SettingsError(
                    f"{source}: key {position} is not usable: a key is at least {MIN_API_KEY_CHARS} printable "
                    "ASCII characters without spaces or commas (or sha256:<64 hex digits>)"
                )
            digest = hash_api_key(key)
        out.append(ApiKey(name or f"key-{digest[:8]}", digest))
    for kind, values in (("name", [k.name for k in out]), ("key", [k.sha256 for k in out])):
        if len(set(values)) != len(values):
            raise SettingsError(f"{source}: the same {kind} is configured twice")
    return tuple(out)


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


EngineName = Literal["sim", "vllm"]


@dataclass(frozen=True, slots=True)
class CommonSettings:
    redis_url: str | None = setting(
        None,
        "Redis URL: redis://[user:password@]host:port/db, rediss:// for TLS, redis+cluster:// or "
        "rediss+cluster:// for a Redis Cluster (any node as the seed); `up` starts an embedded server when unset",
    )
    redis_tls_ca_file: str = setting(
        "", "CA bundle (PEM) that verifies the Redis server's TLS certificate (rediss://; default: the system's)"
    )
    log_level: LogLevel = setting("info", "log level")
    log_format: Literal["plain", "json"] = setting("plain", "log line format")
    log_content: bool = setting(
        False, "also log prompts and generated text (debugging only: off by default, they are users' data)"
    )
    retention_s: float = setting(600.0, "how long a finished request stays replayable", minimum=0.001)
    tombstone_s: float = setting(
        86400.0, "how long after expiry a request id still answers 410 Gone instead of 404", minimum=0.0
    )
    request_ttl_s: float = setting(
        3600.0, "upper bound on how long an unfinished request's keys live in Redis", minimum=1.0
    )
    worker_ttl_s: float = setting(5.0, "a worker not heard from for this long is not live", minimum=0.1)
    queue_timeout_s: float = setting(600.0, "a request still queued after this long ends with an error", minimum=0.01)
    request_deadline_s: float = setting(
        3600.0, "a request still running this long after it was enqueued ends with an error", minimum=0.01
    )
    disconnect_grace_s: float = setting(
        30.0,
        "a request nobody is attached to for this long is cancelled (unless created with background)",
        minimum=0.0,
    )

    def __post_init__(self) -> None:
        problem = None if self.redis_url is None else redis_url_problem(self.redis_url, self.redis_tls_ca_file)
        if problem is not None:
            raise SettingsError(f"TOKENSPOOL_REDIS_URL (--redis-url): {problem}")


@dataclass(frozen=True, slots=True)
class GatewaySettings(CommonSettings):
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port to listen on", minimum=0)
    fd: int | None = setting(None, "listen on this inherited socket instead (used by `tokenspool up`)", minimum=0)
    grpc_port: int | None = setting(None, "serve the gRPC ChatService on this port (default: off)", minimum=0)
    heartbeat_s: float = setting(15.0, "SSE comment heartbeat interval on idle streams", minimum=0.01)
    send_timeout_s: float = setting(
        30.0, "a client that takes longer than this to accept a write is dropped", minimum=0.01
    )
    max_body_bytes: int = setting(1_048_576, "largest request body accepted (413 above)", minimum=1)
    max_queue_depth: int = setting(1000, "waiting requests per model before new ones get 429", minimum=1)
    queue_depth_fresh_ms: float = setting(
        100.0,
        "how long a reading of a queue's depth is reused while the queue is under half of max_queue_depth "
        "(0: read it on every submission)",
        minimum=0.0,
    )
    replay_batch_events: int = setting(256, "events per Redis range read when replaying", minimum=1)
    client_buffer_events: int = setting(
        1024, "events buffered per client before it is switched to catch-up reads from Redis", minimum=1
    )
    reader_block_ms: int = setting(5000, "how long the multiplexed reader's XREAD blocks", minimum=1)
    queue_status_interval_s: float = setting(1.0, "how often a queued stream reports its position", minimum=0.01)
    inter_token_timeout_s: float = setting(
        60.0,
        "a stream that gets no event for this long while its request runs is closed with an error "
        "(the request goes on; keep it above the failover time)",
        minimum=0.01,
    )
    attach_refresh_s: float = setting(5.0, "how often a gateway renews its clients' attachments", minimum=0.05)
    metrics_multiproc_dir: str = setting(
        "",
        "directory shared by gateway processes behind one port, so that /metrics on any of them reports all "
        "(prometheus-client's multiprocess mode; `tokenspool up` sets it; empty: this process only)",
    )
    model_grace_s: float = setting(
        300.0, "a model stays accepted this long after its last worker was heard from", minimum=0.0
    )
    api_keys: tuple[ApiKey, ...] = setting(
        (),
        "API keys clients must send as `Authorization: Bearer KEY`, comma-separated, each `[name:]key` or "
        "`[name:]sha256:<hex>` (hashed at start, never kept); with api_keys_file, both sets are accepted",
    )
    api_keys_file: str = setting(
        "", "file of API keys, one `[name:]key` or `[name:]sha256:<hex>` per line (# comments); read at start"
    )
    allow_open: bool = setting(
        False,
        "serve without API keys on a non-loopback host (without keys a gateway otherwise refuses to start "
        "there: streams would be readable by anyone who can reach it)",
    )
    key_requests_per_minute: int = setting(
        0, "requests one API key may submit per minute (fixed one-minute windows, all gateways; 0: no limit)", minimum=0
    )
    key_max_streams: int = setting(
        0, "streams one API key may have open at once across all gateways (0: no limit)", minimum=0
    )
    key_max_tokens: int = setting(
        0, "largest max_tokens one request may ask for, and the default when it asks none (0: no cap)", minimum=0
    )
    max_prompt_chars: int = setting(
        200_000, "largest prompt accepted: the characters of all its messages together (400 above)", minimum=1
    )
    max_messages: int = setting(256, "most messages one chat request may carry (400 above)", minimum=1)
    max_connections: int = setting(
        10_000,
        "HTTP requests and WebSockets one gateway serves at once, open streams included (503 above; "
        "health, readiness and metrics are never refused)",
        minimum=1,
    )
    cors_origins: str = setting(
        "",
        "origins (comma-separated, e.g. https://app.example.com, or *) whose browser pages may call the API; "
        "empty: no cross-origin access",
    )

    def __post_init__(self) -> None:
        CommonSettings.__post_init__(self)
        for origin in self.cors_origin_list():
            if origin != "*" and re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", origin) is None:
                raise SettingsError(
                    f"TOKENSPOOL_CORS_ORIGINS (--cors-origins): {origin!r} is not an origin "
                    "(scheme://host[:port], no path) or *"
                )
        if not self.api_keys and not self.api_keys_file and not self.allow_open and not is_loopback(self.host):
            raise SettingsError(
                f"no API key is configured and the gateway would listen on {self.host}: set TOKENSPOOL_API_KEYS "
                "or TOKENSPOOL_API_KEYS_FILE (--api-keys, --api-keys-file), or serve openly on purpose with "
                "TOKENSPOOL_ALLOW_OPEN=true (--allow-open)"
            )

    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]


@dataclass(frozen=True, slots=True)
class WorkerSettings(CommonSettings):
    engine: EngineName = setting("sim", "inference engine: `sim` (simulated, for tests and demos) or `vllm`")
    model: str | None = setting(None, "model to serve (vllm: Hugging Face id or folder); sim: its name")
    served_model_name: str | None = setting(None, "name clients use for the model (default: --model)")
    worker_id: str | None = setting(None, "this worker's id (default: host-pid-random)", flag="--id")
    max_num_seqs: int = setting(64, "requests run at once; the worker pulls only this many", minimum=1)
    metrics_port: int | None = setting(None, "serve Prometheus metrics on this port (default: off)", minimum=0)
    metrics_host: str = setting(
        "127.0.0.1", "address the metrics port listens on (0.0.0.0 in a container, so Prometheus can reach it)"
    )
    worker_heartbeat_s: float = setting(1.0, "registry heartbeat interval", minimum=0.01)
    stream_maxlen: int = setting(100_000, "events kept per request stream while it runs", minimum=1)
    max_unflushed_events: int = setting(4096, "events a request may buffer while Redis is slow", minimum=1)
    lease_timeout_s: float = setting(
        3.0, "a running request whose worker stops renewing its lease this long is taken over", minimum=0.1
    )
    max_attempts: int = setting(3, "attempts before a request that keeps failing workers is dead-lettered", minimum=1)
    drain_timeout_s: float = setting(30.0, "on SIGTERM, how long running requests may take to finish", minimum=0.0)
    sim_ttft_ms: float = setting(50.0, "sim engine: time to first token", minimum=0.0)
    sim_itl_ms: float = setting(20.0, "sim engine: time between tokens", minimum=0.0)
    sim_default_max_tokens: int = setting(
        128, "sim engine: longest natural reply when a request sets no max_tokens", minimum=1
    )
    sim_fail_marker: str = setting(
        "", "sim engine: a prompt containing this text fails after its first token (fault injection for clients)"
    )
    sim_crash_marker: str = setting(
        "", "sim engine: a prompt containing this text kills the worker process mid-request (fault injection)"
    )
    dtype: str = setting("auto", "vllm: weight dtype (auto, float32, bfloat16, float16)")
    max_model_len: int | None = setting(None, "vllm: context length", minimum=1)
    gpu_memory_utilization: float = setting(0.9, "vllm: share of GPU memory for weights and KV cache", minimum=0.01)
    tensor_parallel_size: int = setting(1, "vllm: GPUs per engine", minimum=1)
    enforce_eager: bool = setting(False, "vllm: disable CUDA graphs")
    engine_args_json: str = setting("", "vllm: extra AsyncEngineArgs as a JSON object")
    engine_cpus: str = setting(
        "", "vllm: CPUs the engine's processes are confined to, e.g. `0` or `0-3,8` (default: all)"
    )

    def __post_init__(self) -> None:
        CommonSettings.__post_init__(self)
        parse_cpu_list(self.engine_cpus)


def parse_cpu_list(text: str) -> frozenset[int]:
    """``0-3,8`` -> {0, 1, 2, 3, 8}; empty -> empty (no restriction). SettingsError on anything else."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()) or (sep and int(high) < int(low)):
            raise SettingsError(f"TOKENSPOOL_ENGINE_CPUS (--engine-cpus): expected a CPU list like 0-3,8, got {text!r}")
        cpus.update(range(int(low), int(high if sep else low) + 1))
    return frozenset(cpus)


S = TypeVar("S", bound=CommonSettings)

_ALL_CLASSES: tuple[type[CommonSettings], ...] = (CommonSettings, GatewaySettings, WorkerSettings)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(f: dataclasses.Field[Any]) -> str:
    flag: str | None = f.metadata.get("flag")
    return flag or "--" + f.name.replace("_", "-")


def known_env_names() -> set[str]:
    return {env_name(f.name) for cls in _ALL_CLASSES for f in dataclasses.fields(cls)}


def _parse(raw: str, annotation: Any, source: str) -> Any:
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if raw.strip() == "":
            return None
        return _parse(raw, inner[0], source)
    if origin is Literal:
        if raw not in args:
            raise SettingsError(f"{source}: expected one of {', '.join(map(str, args))}, got {raw!r}")
        return raw
    if annotation is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{source}: expected true or false, got {raw!r}")
    if annotation is int:
        try:
            return int(raw.strip(), 10)
        except ValueError:
            raise SettingsError(f"{source}: expected an integer, got {raw!r}") from None
    if annotation is float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise SettingsError(f"{source}: expected a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise SettingsError(f"{source}: expected a finite number, got {raw!r}")
        return value
    if annotation is str:
        return raw
    if annotation == tuple[ApiKey, ...]:
        return parse_api_keys([entry for entry in raw.split(",") if entry.strip()], source)
    raise TypeError(f"unsupported settings type {annotation!r}")


def load_settings(cls: type[S], environ: Mapping[str, str], flags: Mapping[str, str | None] | None = None) -> S:
    """Build ``cls`` from ``flags`` (field name -> raw text, None when not given) and ``environ``.

    Raises :class:`SettingsError` naming the first bad value or unknown ``TOKENSPOOL_*`` variable.
    """
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known_env_names())
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]} (`tokenspool settings` lists them all)")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    flags = flags or {}
    for f in dataclasses.fields(cls):
        raw_flag = flags.get(f.name)
        if raw_flag is not None:
            values[f.name] = _parse(raw_flag, hints[f.name], flag_name(f))
        elif env_name(f.name) in environ:
            values[f.name] = _parse(environ[env_name(f.name)], hints[f.name], env_name(f.name))
    for f in dataclasses.fields(cls):
        minimum = f.metadata.get("minimum")
        value = values.get(f.name, f.default)
        if minimum is not None and value is not None and value < minimum:
            raise SettingsError(f"{env_name(f.name)} ({flag_name(f)}): must be at least {minimum}, got {value}")
    return cls(**values)


def as_environment(settings: CommonSettings) -> dict[str, str]:
    """The ``TOKENSPOOL_*`` variables that rebuild ``settings`` in a child process."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            out[env_name(f.name)] = "true" if value else "false"
        elif isinstance(value, tuple):
            out[env_name(f.name)] = ",".join(key.entry() for key in value)
        else:
            out[env_name(f.name)] = str(value)
    return out
