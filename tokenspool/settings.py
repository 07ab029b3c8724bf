"""Every component's settings, for the command that starts them (it stands apart from the components, so it
may know them all). Gateways and workers started together share one environment: each accepts the other's
``TOKENSPOOL_*`` variables, and only a name no component knows is refused as a typo."""

from __future__ import annotations

from collections.abc import Mapping

from tokenspool.gateway.settings import GatewaySettings
from tokenspool.shared.settings import CommonSettings, S, known_env_names, load_settings
from tokenspool.worker.settings import WorkerSettings

SETTINGS_CLASSES: tuple[type[CommonSettings], ...] = (CommonSettings, GatewaySettings, WorkerSettings)

SET_BY_UP: frozenset[str] = frozenset({"fd", "worker_id", "metrics_multiproc_dir"})
"""The settings ``tokenspool up`` gives its children itself (the shared socket, each worker's id, the gateways'
shared metrics folder); every other gateway and worker setting is a flag of ``up``."""


def every_env_name() -> set[str]:
    """The variables of every component (what ``tokenspool settings`` lists)."""
    return known_env_names(*SETTINGS_CLASSES)


def load(cls: type[S], environ: Mapping[str, str], flags: Mapping[str, str | None] | None = None) -> S:
    """One component's settings from an environment the components share."""
    return load_settings(cls, environ, flags, known=every_env_name())
