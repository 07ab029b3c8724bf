"""Listening on a TCP port with an answer a person can act on when the port cannot be had.

Every port tokenspool opens (a gateway's HTTP and gRPC ports, a worker's metrics port, the port ``up``
shares between its gateways) is bound through :func:`listen`, or checked with it, so a busy port ends the
process with one line that names the port, what it was for, the setting that chose it and what to do,
instead of a bare ``OSError`` traceback from deep inside a server library.
"""

from __future__ import annotations

import errno
import socket


class PortUnavailableError(RuntimeError):
    """A port that cannot be listened on; the message says which, for what, and what to do."""


def unavailable(what: str, host: str, port: int, setting: str, error: OSError) -> PortUnavailableError:
    """The error for ``what`` (e.g. "the gateway port") at ``host:port``, chosen by ``setting`` (its
    variable and flag), that failed with ``error``."""
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    if error.errno == errno.EADDRINUSE:
        return PortUnavailableError(
            f"{what} {where} is already in use ({setting}): stop the process that listens there "
            f"(`ss -ltnp 'sport = :{port}'` names it) or choose another port"
        )
    if error.errno == errno.EACCES:
        return PortUnavailableError(
            f"{what} {where}: permission denied ({setting}); ports below 1024 need privileges: choose a port "
            "of 1024 or above"
        )
    if error.errno == errno.EADDRNOTAVAIL:
        return PortUnavailableError(
            f"{what} {where}: {host} is not an address of this machine ({setting}); use one it has, "
            "such as 127.0.0.1 or 0.0.0.0"
        )
    return PortUnavailableError(f"cannot listen on {where} for {what} ({setting}): {error.strerror or error}")


def listen(
    host: str, port: int, *, what: str, setting: str, backlog: int = 2048, reuse_port: bool = False
) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), or :class:`PortUnavailableError`.

    ``reuse_port`` sets ``SO_REUSEPORT`` (several processes listening on one port, as gRPC servers do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog, reuse_port=reuse_port)
    except OSError as exc:
        raise unavailable(what, host, port, setting, exc) from None


def check_free(host: str, port: int, *, what: str, setting: str, reuse_port: bool = False) -> None:
    """Raise :class:`PortUnavailableError` unless ``host:port`` can be listened on now (for a server that
    binds the port itself, later, and would otherwise fail deep inside its library)."""
    listen(host, port, what=what, setting=setting, backlog=1, reuse_port=reuse_port).close()
