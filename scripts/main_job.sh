#!/usr/bin/env bash
# The main job: real model, real `vllm serve --attention-backend kvplug`, one
# long-context (passkey) request, result printed.  Pick a policy with
# KVPLUG_POLICY / KVPLUG_CONFIG; arguments go to `kvplug demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/kvplug demo "$@"
