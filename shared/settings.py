"""Settings: one frozen object per process, built once at start from flags and ``TOKENSPOOL_*`` variables.

Every field is a setting with an environment variable named ``TOKENSPOOL_<FIELD>`` and a command-line
flag ``--<field-with-dashes>``; a flag beats the environment, which beats the default. Parsing is
strict: a value of the wrong type, out of range or not among the choices, or an unknown
``TOKENSPOOL_*`` variable (a typo would otherwise be ignored silently), raises :class:`SettingsError`
with a message that names the variable. Units are in the names (``_s``, ``_ms``, ``_bytes``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar, Union, get_args, get_origin
from urllib.parse import unquote, urlsplit

ENV_PREFIX = "TOKENSPOOL_"


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it and says what was expected."""


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    flag: str | None = None,
    parse: Callable[[str, str], Any] | None = None,
    unparse: Callable[[Any], str] | None = None,
) -> Any:
    """A settings field: its default, its help text, an optional lower bound and flag name, and for a type
    the generic parser does not know, ``parse(raw, source)`` and its inverse ``unparse(value)`` (a component's
    own types, such as the gateway's API keys, stay in that component's settings module)."""
    metadata = {"help": help, "minimum": minimum, "flag": flag, "parse": parse, "unparse": unparse}
    return field(default=default, metadata=metadata)


REDIS_SCHEMES: Final = {
    "redis": False,
    "rediss": False,
    "redis+cluster": True,
    "rediss+cluster": True,
    "redis+sentinel": False,
    "rediss+sentinel": False,
}
"""The Redis URL schemes tokenspool accepts, and whether each means a Redis Cluster."""

SENTINEL_SCHEMES: Final = frozenset({"redis+sentinel", "rediss+sentinel"})
"""The schemes of a Sentinel-managed primary (see :func:`parse_sentinel_url`)."""

SENTINEL_DEFAULT_PORT: Final = 26379


def redis_url_problem(url: str, tls_ca_file: str) -> str | None:
    """What is wrong with this Redis URL and CA file together, or None."""
    scheme = urlsplit(url).scheme
    if scheme not in REDIS_SCHEMES:
        shown = scheme + "://" if scheme else "no scheme"
        return (
            "expected a redis://, rediss://, redis+cluster://, rediss+cluster://, redis+sentinel:// or "
            f"rediss+sentinel:// URL, got {shown}"
        )
    if tls_ca_file and not scheme.startswith("rediss"):
        return "a TLS CA file is set (TOKENSPOOL_REDIS_TLS_CA_FILE) but the URL is not rediss://"
    if scheme in SENTINEL_SCHEMES:
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            return str(exc)
    return None


def replica_ack_problem(url: str | None, min_replicas_acked: int) -> str | None:
    """Why waiting for replicas cannot work with this URL, or None. A cluster spreads one engine step's
    appends over several primaries, each needing a WAIT of its own: not supported (yet)."""
    if min_replicas_acked > 0 and url is not None and REDIS_SCHEMES.get(urlsplit(url).scheme, False):
        return "waiting for replicas is supported on one primary (redis://, redis+sentinel://), not on a Redis Cluster"
    return None


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """A ``redis+sentinel://`` URL, parsed: where the sentinels are, which primary (service) to ask them for,
    and how to log in to it."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


_SENTINEL_FORM: Final = "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]"
_SENTINEL_HOST: Final = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::([0-9]{1,5}))?")
_SENTINEL_SERVICE: Final = re.compile(r"[A-Za-z0-9._-]+")


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]`` strictly
    (``rediss+sentinel://``: TLS to the sentinels and to the primary). A port defaults to 26379, the db to 0;
    the user and password (percent-encoded) log in to the primary and its replicas, not to the sentinels.
    Raises ValueError saying what is wrong (never showing the password)."""
    scheme, sep, rest = url.partition("://")
    if scheme not in SENTINEL_SCHEMES or not sep:
        raise ValueError(f"not a Sentinel URL: expected {_SENTINEL_FORM}")
    if "?" in rest or "#" in rest:
        raise ValueError(f"a Sentinel URL takes no query or fragment: expected {_SENTINEL_FORM}")
    authority, _, path = rest.partition("/")
    credentials, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if password is None and username is not None:
            raise ValueError(f"a Sentinel URL names a user without a password: expected {_SENTINEL_FORM}")
    sentinels: list[tuple[str, int]] = []
    for host in hosts.split(","):
        match = _SENTINEL_HOST.fullmatch(host)
        port = int(match.group(2) or SENTINEL_DEFAULT_PORT) if match else 0
        if match is None or not 1 <= port <= 65535:
            raise ValueError(f"bad sentinel address {host!r}: expected host[:port] (port 1-65535), {_SENTINEL_FORM}")
        sentinels.append((match.group(1).strip("[]"), port))
    service, _, db_text = path.partition("/")
    if not _SENTINEL_SERVICE.fullmatch(service):
        raise ValueError(f"a Sentinel URL needs the primary's service name after the hosts: {_SENTINEL_FORM}")
    if db_text and not db_text.isdigit():
        raise ValueError(f"bad database {db_text!r} in a Sentinel URL: expected a number, {_SENTINEL_FORM}")
    if len(set(sentinels)) != len(sentinels):
        raise ValueError("a Sentinel URL names the same sentinel twice")
    return SentinelURL(tuple(sentinels), service, int(db_text or 0), username, password, scheme.startswith("rediss"))


LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True, slots=True)
class CommonSettings:
    redis_url: str | None = setting(
        None,
        "Redis URL: redis://[user:password@]host:port/db, rediss:// for TLS, redis+cluster:// or "
        "rediss+cluster:// for a Redis Cluster (any node as the seed), redis+sentinel://[user:password@]"
        "host:port,host:port/service[/db] for a Sentinel-managed primary; `up` starts an embedded server when unset",
    )
    redis_tls_ca_file: str = setting(
        "", "CA bundle (PEM) that verifies the Redis server's TLS certificate (rediss://; default: the system's)"
    )
    redis_min_replicas_acked: int = setting(
        0,
        "a worker's append (per engine step) and a new request count as written only once this many replicas "
        "have them (Redis WAIT); 0: once the primary has them, so a failover can lose the last writes",
        minimum=0,
    )
    redis_replica_ack_timeout_ms: int = setting(
        1000,
        "how long one WAIT waits for the replicas; writes not confirmed in time are resent by a worker and "
        "answered 503 by a gateway",
        minimum=1,
    )
    redis_pool_connections: int = setting(
        4,
        "Redis connections a gateway or worker process keeps for its commands, whatever its load (concurrent "
        "commands wait their turn for one); its blocking reads have one connection each besides these",
        minimum=1,
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
        replicas_problem = replica_ack_problem(self.redis_url, self.redis_min_replicas_acked)
        if replicas_problem is not None:
            raise SettingsError(f"TOKENSPOOL_REDIS_MIN_REPLICAS_ACKED (--redis-min-replicas-acked): {replicas_problem}")
        require_at_least(
            self,
            "request_ttl_s",
            "queue_timeout_s",
            1,
            "a queued request's keys live request_ttl_s from its submission, so with a shorter one a request "
            "vanishes while it waits, before its queue timeout can end it with an error",
        )


def require_at_least(settings: CommonSettings, name: str, base: str, factor: float, why: str) -> None:
    """Refuse settings where ``name`` is below ``factor`` times ``base``: a relation without which they
    cannot work. The message names both as people set them and says why the rule holds."""
    value, floor = getattr(settings, name), getattr(settings, base)
    if value >= factor * floor:
        return
    fields = {f.name: f for f in dataclasses.fields(settings)}
    times = "" if factor == 1 else f"{factor:g} times "
    raise SettingsError(
        f"{env_name(name)} ({flag_name(fields[name])}) must be at least {times}{env_name(base)} "
        f"({flag_name(fields[base])}), got {value:g} and {floor:g}: {why}"
    )


S = TypeVar("S", bound=CommonSettings)


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(f: dataclasses.Field[Any]) -> str:
    flag: str | None = f.metadata.get("flag")
    return flag or "--" + f.name.replace("_", "-")


def known_env_names(*classes: type[CommonSettings]) -> set[str]:
    """The variables of these settings classes (the components that share one environment)."""
    return {env_name(f.name) for cls in classes for f in dataclasses.fields(cls)}


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
    raise TypeError(f"unsupported settings type {annotation!r}")


def load_settings(
    cls: type[S],
    environ: Mapping[str, str],
    flags: Mapping[str, str | None] | None = None,
    *,
    known: Collection[str] = (),
) -> S:
    """Build ``cls`` from ``flags`` (field name -> raw text, None when not given) and ``environ``.

    ``known`` names the variables of the other components that share this environment (they are not
    typos); the command that starts the components passes all of theirs.
    Raises :class:`SettingsError` naming the first bad value or unknown ``TOKENSPOOL_*`` variable.
    """
    own = known_env_names(cls)
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in own and k not in known)
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]} (`tokenspool settings` lists them all)")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    flags = flags or {}
    for f in dataclasses.fields(cls):
        raw_flag = flags.get(f.name)
        parse = f.metadata.get("parse") or (lambda raw, source, hint=hints[f.name]: _parse(raw, hint, source))
        if raw_flag is not None:
            values[f.name] = parse(raw_flag, flag_name(f))
        elif env_name(f.name) in environ:
            values[f.name] = parse(environ[env_name(f.name)], env_name(f.name))
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
        unparse = f.metadata.get("unparse")
        if unparse is not None:
            out[env_name(f.name)] = unparse(value)
        elif isinstance(value, bool):
            out[env_name(f.name)] = "true" if value else "false"
        else:
            out[env_name(f.name)] = str(value)
    return out
