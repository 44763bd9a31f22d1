#!/usr/bin/env bash
# The GPU check (benchmarks/gpu.py) on a machine with a GPU: under 8 minutes on one GPU.
#
# On a machine with a GPU and geovae's dependencies installed:
#     bash benchmarks/gpu.sh [--size 4096] [--json results.jsonl]
# On the device tool's machines (PyTorch there, no rasterio/shapely/pyproj/pystac, no network):
#     1. here, once:   bash benchmarks/gpu.sh --fetch-wheels     (wheels into .whl/, ignored by git)
#     2. there:        run "bash benchmarks/gpu.sh" with carry [".whl"]
# It prints model-only MP/s of the default VAE in fp32, bf16 and compiled, end-to-end MP/s,
# the fraction of the run the GPU was busy, the peak GPU memory, the same for the onnxruntime
# backend (its CUDA execution provider) and the CUDA-only tests. The onnxruntime backend needs
# onnxruntime-gpu, onnx and onnxscript installed there (pip install onnxruntime-gpu onnx onnxscript);
# the onnxruntime-gpu wheel (about 250 MB) is more than the device tool carries, so on its
# machines the script records that it is missing instead of measuring it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python

if [ "${1:-}" = "--fetch-wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # What the pipeline needs beyond PyTorch, numpy and safetensors, for CPython 3.12 on x86-64.
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl rasterio affine cligj click-plugins shapely pyproj pystac
    du -sh .whl
    exit 0
fi

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/geovae-site .whl/*.whl
    export PYTHONPATH="/tmp/geovae-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu "$@"
