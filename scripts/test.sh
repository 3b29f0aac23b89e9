#!/usr/bin/env bash
# Install and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/python -m pytest -q -rs --durations=15 tests "$@"
