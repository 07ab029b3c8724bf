"""``vllm serve`` as a differential tests' reference: started on a model folder, pinned to core 1 (the
tokenspool worker's engine takes core 0), waited for, and stopped; and the tokenspool vLLM worker it is
compared with, started with the same engine flags.

The vLLM parity modules compare tokenspool's answers with this server's for the same model and flags."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

from tests.support import Cluster, Worker, wait_for
from tokenspool.redis_server import free_port


@contextlib.contextmanager
def vllm_serve(
    model_dir: Path, served_model_name: str, log_path: Path, flags: Sequence[str] = (), env: Mapping[str, str] = {}
) -> Iterator[str]:
    """Run ``vllm serve`` on ``model_dir`` (float32, a 1024-token context, eager, plus ``flags``) with ``env``
    added to this process's; yield its URL once it lists its model; terminate it (then kill) on the way out."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--served-model-name", served_model_name, "--dtype", "float32", "--max-model-len", "1024"]
    argv += ["--enforce-eager", "--port", str(port), *flags]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["taskset", "-c", "1", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env, "VLLM_CPU_OMP_THREADS_BIND": "1"},
        )
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, f"vllm serve exited; see {log_path}"
            try:
                return httpx.get(url + "/v1/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(ready, 300, "vllm serve to answer", interval_s=1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_vllm_worker(
    cluster: Cluster, model_dir: Path, served_model_name: str, env: Mapping[str, str] = {}, **flags: str
) -> Worker:
    """A tokenspool vLLM worker with the engine flags :func:`vllm_serve` gives ``vllm serve`` (plus
    ``flags``), its engine on core 0; not waited for (the gateway's wait for the model is)."""
    return cluster.worker(
        engine="vllm",
        model=model_dir,
        served_model_name=served_model_name,
        dtype="float32",
        max_model_len=1024,
        enforce_eager="true",
        max_num_seqs=8,
        wait=False,
        engine_cpus="0",
        env={**env, "VLLM_CPU_OMP_THREADS_BIND": "0"},
        **flags,
    )
