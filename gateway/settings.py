"""The gateway's settings (the shared machinery, and the settings every process has, are in
:mod:`tokenspool.shared.settings`), and the API keys it parses from them: a key is hashed while the setting
is parsed."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from tokenspool.shared.settings import CommonSettings, SettingsError, setting

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
    header_timeout_s: float = setting(
        10.0,
        "a connection that has not sent a whole request head (request line and headers) this long after it "
        "opened, or after its previous response, is closed",
        minimum=0.01,
    )
    body_timeout_s: float = setting(
        30.0, "a request body that has not all arrived this long after its head is answered 408", minimum=0.01
    )
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
        parse=lambda raw, source: parse_api_keys([entry for entry in raw.split(",") if entry.strip()], source),
        unparse=lambda keys: ",".join(key.entry() for key in keys),
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
        "health, readiness and metrics are never refused); open sockets count too, a socket still sending "
        "its request included, with room for 32 more (probes)",
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
