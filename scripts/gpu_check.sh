#!/usr/bin/env bash
# The prepared GPU check (one H100/H200; no row starts after --budget-s, 420 s by default, so
# it ends a row's length after that; GPU_TESTS=1 adds the GPU-only tests first): Wan2.1-T2V-1.3B shape, random
# weights, bf16. Asserts the fast engine, compiled and as CUDA graphs, matches the eager loop,
# then prints the speed table for docs/PERFORMANCE.md. Needs only the machine's torch and
# this repository (no install, nothing downloaded); a diffusers wheel carried in .whl/ adds
# the VAE-decode column (fetch it beforehand where PyPI is reachable, e.g.
# `pip download --no-deps -d .whl "diffusers==$(pip show diffusers | sed -n 's/^Version: //p')"`;
# git ignores .whl/).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# GPU_TESTS=1 first runs the test suite's GPU-only tests (tiny shapes: CUDA graphs against the
# eager loop for each compile scope and attention kernel, the side-stream decode): a test still
# running after 100 s has every stack printed and ends pytest (pytest-timeout, on the device
# image; its thread method works even inside a stuck CUDA call), and all of them get 240 s; a
# failure is reported and the check still runs.
if [ "${GPU_TESTS:-0}" = 1 ]; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu --timeout 100 --timeout-method thread \
        tests/inference/test_engine.py tests/inference/test_pipeline.py || echo "GPU TESTS FAILED OR TIMED OUT (above)"
fi
python3 benchmarks/gpu_check.py "$@"
