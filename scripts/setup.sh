#!/usr/bin/env bash
# Create .venv/ in the repo root (reused when present), install kvplug with the
# vLLM build for this machine, and provision the default model.  Sourced by
# main_job.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$PY" -m venv .venv

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras="cuda,dev"
else
  extras="cpu,dev"
fi
# Reinstall only when the dependency spec changed (the install is editable).
stamp=".venv/.kvplug-install-$(sha1sum pyproject.toml | cut -c1-12)-$extras"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing kvplug[$extras] into .venv (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  # PyPI builds of these break `import transformers` next to torch's CPU wheel.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  .venv/bin/kvplug vllm-alias
  rm -f .venv/.kvplug-install-* && touch "$stamp"
fi
.venv/bin/kvplug models fetch >/dev/null
