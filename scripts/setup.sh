#!/usr/bin/env bash
# Make .venv (Python >= 3.12) in the repository root and install geovae into it with its test and lint
# tools. Idempotent: does nothing when .venv is already up to date with pyproject.toml.
# Pick the interpreter with PYTHON=/path/to/python3.12 if it is not found by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

ok() { "$@" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
    if [ -n "${PYTHON:-}" ]; then
        ok "$PYTHON" && { echo "$PYTHON"; return; }
        echo "setup: PYTHON=$PYTHON is not a Python >= 3.12" >&2; exit 1
    fi
    # 3.12 first: it is the version the project is tested on, and wheels exist for it everywhere
    for c in python3.12 python3.13 python3.14 python3; do
        if command -v "$c" >/dev/null && ok "$c"; then command -v "$c"; return; fi
    done
    # pyenv keeps versions that are not on PATH (its shims refuse them unless selected)
    for p in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do
        ok "$p" && { echo "$p"; return; }
    done
    echo "setup: no Python >= 3.12 found; install one, or run with PYTHON=/path/to/python3.12" >&2
    exit 1
}

stamp=.venv/.geovae-setup
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
py="$(find_python)"
echo "setup: making .venv with $py ($("$py" --version 2>&1))" >&2
[ -x .venv/bin/python ] || "$py" -m venv .venv
pipi() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
# One retry: an install interrupted elsewhere can leave pip's cache briefly inconsistent.
pipi --upgrade pip || pipi --upgrade pip
# torch from the registry is a CUDA build (about 3 GB); the first install takes a few minutes
pipi -e ".[dev]" || { echo "setup: install failed, retrying once" >&2; pipi -e ".[dev]"; }
echo "$want" > "$stamp"
echo "setup: ready (.venv/bin/geovae)" >&2
