"""``vllm serve`` as a differential tests' reference: started on a model folder, pinned to core 1 (the
tokenspool worker's engine takes core 0), waited for, and stopped; and the tokenspool vLLM worker it is
compared with, started with the same engine flags; and the takeover both parity modules run (a worker killed
mid-request, the next one finishing it).

The vLLM parity modules compare tokenspool's answers with this server's for the same model and flags."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.support import Cluster, SSEEvent, Worker, read_stream, wait_for
from tokenspool.redis_server import free_port
from tokenspool.shared import handover, keys, wire


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
    cluster: Cluster, model_dir: Path, served_model_name: str, env: Mapping[str, str] = {}, **flags: Any
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


def taken_over_by_the_next_worker(
    start_worker: Callable[[Cluster, Path], Worker],
    cluster: Cluster,
    model_dir: Path,
    workers: list[Worker],
    url: str,
    body: dict[str, Any],
    far_enough: Callable[[list[wire.Event]], bool],
) -> list[SSEEvent]:
    """Submit ``body``, SIGKILL the module's worker (and its engine) once its stored events are ``far_enough``
    but not finished, start the next worker (``start_worker``: the module's, with its flags), and return the
    request's whole stream once that one finished it (checked to have a handover in it)."""
    doomed = workers[0]
    pid = doomed.proc.process.pid
    engine = [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    events: str = ""

    def stored() -> list[wire.Event]:
        return [wire.decode(f[b"d"], wire.Event) for _, f in cluster.redis.xrange(events)]  # type: ignore[index]

    def far_enough_or_ended() -> bool:
        got = stored()
        return far_enough(got) or bool(got and got[-1].terminal)

    # On a loaded machine vLLM hands a lagging reader several steps' tokens in one output, and a request can
    # end before it was seen far enough: it is then submitted again (what is asserted is the takeover).
    for _ in range(3):
        # In the background: nobody reads the stream until the next worker finished it, which on a loaded
        # machine can take longer than the grace period after which a request nobody follows is cancelled.
        with httpx.stream("POST", url, json={**body, "background": True}, timeout=120) as response:
            request_id = response.headers["x-request-id"]
        events = keys.RequestKeys.of(request_id).events
        try:
            wait_for(far_enough_or_ended, 120, "the request to be far enough")
        except AssertionError as exc:  # say what Redis holds
            raise AssertionError(f"{exc}: {len(stored())} events stored, meta {cluster.meta(request_id)}") from None
        os.kill(pid, signal.SIGSTOP)  # no more writes: what is stored now is what the next worker finds
        if not stored()[-1].terminal:
            break
        os.kill(pid, signal.SIGCONT)
    assert not stored()[-1].terminal, "three requests ended before they were seen far enough"
    for victim in [pid, *engine]:
        os.kill(victim, signal.SIGKILL)
    doomed.proc.process.wait(30)
    workers[0] = start_worker(cluster, model_dir)
    wait_for(lambda: cluster.meta(request_id).get("state") == "done", 300, "the next worker to finish the request")
    taken_over = read_stream("GET", f"{url.rsplit('/v1/', 1)[0]}/v1/requests/{request_id}/events", timeout_s=120)
    assert any(c.lstrip().startswith(handover.HANDOVER_COMMENT_KEYWORD) for c in taken_over.comments)
    return taken_over.events
