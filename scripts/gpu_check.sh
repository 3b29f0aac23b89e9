#!/usr/bin/env bash
# The GPU checks of the kernels in one go, for a session lent a GPU (at most 9.5 min on an
# H200): kvplug's kernel tests compiled on the GPU, then the decode kernel benchmark
# (32k/64k/128k, batch 1 and 8, Llama-3.1-8B attention shapes, bf16) and the HF path's
# decode of a random-init Llama-3.1-8B-shaped model at 32k (full, quest, shadowkv;
# `python -m kvplug.hf_decode`).
#
#   OUT=evals/results/kernels/h200 bash scripts/gpu_check.sh
#
# Needs only torch, triton and transformers (kvplug is installed without dependencies
# into a temporary folder, offline); vLLM is not needed, and its engine path is not run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-evals/results/kernels/gpu}
mkdir -p "$OUT"
site=$(mktemp -d)
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$site" .
# -P: kvplug comes from $site, not the checkout's kvplug/ folder (its kernels live in kernels/)
export PYTHONPATH=$site PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/device.txt"
# a failing kernel test is reported, and the benchmark still runs
KVPLUG_TEST_DEVICE=cuda timeout 150 python3 -P -m pytest -q -rs -p no:cacheprovider tests/kernels \
  2>&1 | tee "$OUT/kernel_tests.log" || true
timeout 240 python3 -P -m kvplug.kernels.bench --out "$OUT" 2>&1 | tee "$OUT/bench.log" || true
timeout 150 python3 -P -m kvplug.hf_decode --out "$OUT" 2>&1 | tee "$OUT/hf_decode.log"
