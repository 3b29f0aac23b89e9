#!/usr/bin/env bash
# Install and run the test suite (what CI runs).  The Triton kernel tests and the
# engine-free tests of the vLLM CUDA backend run first, in their own session under
# Triton's interpreter (no GPU here); the interpreter must not leak into the vLLM
# engines of the other tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
interpreted=(tests/kernels tests/integrations/vllm/test_cuda_backend.py)
TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -rs "${interpreted[@]}"
exec .venv/bin/python -m pytest -q -rs --durations=15 "${interpreted[@]/#/--ignore=}" tests "$@"
