"""vLLM's own metrics (``vllm:*``), served on a vLLM worker's metrics port beside tokenspool's.

People run vLLM's Grafana dashboards and alerts on these series (``vllm:num_requests_running`` and
``_waiting``, ``vllm:kv_cache_usage_perc``, ``vllm:prompt_tokens`` and ``vllm:generation_tokens``,
``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
``vllm:request_time_per_output_token_seconds``, ...), so a vLLM worker exports them unchanged, from vLLM's
own stat loggers rather than a copy of their arithmetic.

How vLLM 0.32 keeps them: ``AsyncLLM`` builds a ``StatLoggerManager`` when ``log_stats`` is on
(``AsyncEngineArgs.disable_log_stats`` is false by default), and that manager always adds vLLM's
``PrometheusStatLogger``, which records every engine step's scheduler and iteration stats into
prometheus-client metrics registered in the registry ``vllm.v1.metrics.prometheus.get_prometheus_registry``
names (the process's default registry; a multiprocess one when ``PROMETHEUS_MULTIPROC_DIR`` is set). This
module reads that registry and passes on its ``vllm:`` families. Setting ``disable_log_stats`` in
``engine_args_json`` turns them off, as ``vllm serve --disable-log-stats`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

VLLM_PREFIX = "vllm:"


class VllmMetrics(Collector):
    """The ``vllm:*`` families of the registry vLLM records into, read at each scrape."""

    def __init__(self, source: Collector) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        # Nothing to declare up front: the names are vLLM's (all ``vllm:``), never the worker's own.
        return ()

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            if family.name.startswith(VLLM_PREFIX):
                yield family


def vllm_metric_collectors() -> list[Collector]:
    """The collector of vLLM's own metrics in this process (vLLM must be importable)."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    return [VllmMetrics(get_prometheus_registry())]
