#!/usr/bin/env bash
# The main job: real model, real `vllm serve --attention-backend kvplug`, one
# long-context (passkey) request served dense, then again by a server that keeps
# a quarter of the prompt's KV (SnapKV); answers, latencies and the KV pool each
# held (the server's own metrics) printed.  The first server's policy comes from
# KVPLUG_POLICY / KVPLUG_CONFIG (default full); arguments go to `kvplug demo`
# (see --help), e.g. --compare '{"policy": "cake", "budget_ratio": 0.125}'.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/kvplug demo --compare '{"policy": "snapkv", "budget_ratio": 0.25}' "$@"
