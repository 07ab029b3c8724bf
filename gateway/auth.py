"""Who is calling: API keys sent as ``Authorization: Bearer KEY``, and the owner each request records.

A resumable stream is a stored conversation, so every request belongs to the key that created it: the
request's metadata holds the key's owner id (128 bits of the key's SHA-256, never the key), and only a
caller with that owner id may read, resume, inspect or cancel it; anyone else is told the request does not
exist (404, not 403, so ids cannot be probed). Keys are hashed once, when the settings are parsed
(:class:`tokenspool.shared.settings.ApiKey`); a key a client sends is hashed and looked up by its hash, so no
comparison ever runs over the key itself.

With no key configured the gateway is open: every caller is :data:`ANONYMOUS` and owns the anonymous
requests, and the settings refuse that on anything but a loopback address unless ``allow_open`` is set.

Browsers cannot set headers on a WebSocket, so ``/v1/ws`` also takes the key inside the
``Sec-WebSocket-Protocol`` offer: the client offers :data:`WS_PROTOCOL` and ``tokenspool.bearer.`` followed by
the key in unpadded base64url (the only characters a subprotocol name may hold), and the gateway answers
with :data:`WS_PROTOCOL` alone, so the key is never echoed. A query-string token was rejected: URLs end up in
proxy logs and browser history.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tokenspool.gateway.errors import APIError
from tokenspool.gateway.settings import ApiKey, GatewaySettings, hash_api_key, parse_api_keys
from tokenspool.shared.settings import SettingsError

WS_PROTOCOL: Final = "tokenspool.v1"
WS_BEARER_PREFIX: Final = "tokenspool.bearer."


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the owner id its requests record, and a name for log lines."""

    owner: str
    name: str


ANONYMOUS: Final = Principal("anonymous", "anonymous")


def unauthorized(message: str, code: str) -> APIError:
    return APIError(401, message, code=code, headers={"WWW-Authenticate": 'Bearer realm="tokenspool"'})


def read_key_file(path: str) -> tuple[ApiKey, ...]:
    """The keys of a key file: one ``[name:]key`` or ``[name:]sha256:<hex>`` per line; blank lines and
    ``#`` comments are skipped. A file that cannot be read or holds no key stops the gateway at start."""
    source = f"TOKENSPOOL_API_KEYS_FILE (--api-keys-file) {path!r}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{source}: cannot read it ({exc.__class__.__name__})") from None
    entries = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise SettingsError(f"{source}: holds no key (an empty key file would leave the gateway open)")
    return parse_api_keys(entries, source)


class KeyRing:
    """The configured keys by hash; built once at start."""

    def __init__(self, api_keys: Iterable[ApiKey]) -> None:
        self._by_hash: dict[str, ApiKey] = {key.sha256: key for key in api_keys}

    @classmethod
    def load(cls, settings: GatewaySettings) -> KeyRing:
        """The keys of ``api_keys`` and ``api_keys_file`` together (SettingsError for a bad file)."""
        from_file = read_key_file(settings.api_keys_file) if settings.api_keys_file else ()
        return cls((*settings.api_keys, *from_file))

    @property
    def open(self) -> bool:
        """True when no key is configured: every caller is anonymous."""
        return not self._by_hash

    def __len__(self) -> int:
        return len(self._by_hash)

    def principal(self, key: str | None) -> Principal:
        """The caller a key stands for; 401 when keys are configured and this is none of them."""
        if self.open:
            return ANONYMOUS
        if not key:
            raise unauthorized("no API key: send it as `Authorization: Bearer YOUR_KEY`", code="missing_api_key")
        found = self._by_hash.get(hash_api_key(key))
        if found is None:
            raise unauthorized("the API key is not valid", code="invalid_api_key")
        return Principal(found.owner, found.name)

    def from_authorization(self, header: str | None) -> Principal:
        """The caller named by an ``Authorization`` header (``Bearer KEY``)."""
        if self.open:
            return ANONYMOUS
        if header is None:
            return self.principal(None)
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise unauthorized("the Authorization header must be `Bearer YOUR_KEY`", code="invalid_api_key")
        return self.principal(key.strip())

    def from_websocket(self, header: str | None, offered: Iterable[str]) -> Principal:
        """The caller of a WebSocket: its ``Authorization`` header, else the key in its subprotocol offer."""
        if self.open or header is not None:
            return self.from_authorization(header)
        for protocol in offered:
            if protocol.startswith(WS_BEARER_PREFIX):
                encoded = protocol.removeprefix(WS_BEARER_PREFIX)
                try:
                    key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
                except (binascii.Error, UnicodeDecodeError, ValueError):
                    raise unauthorized("the API key is not valid", code="invalid_api_key") from None
                return self.principal(key)
        return self.principal(None)
