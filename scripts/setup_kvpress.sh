#!/usr/bin/env bash
# Create .venv-kvpress/ for the kvpress peer (evals/peers/kvpress_ruler.py): kvpress 0.5.5
# pins transformers<5.3 (and through it huggingface-hub<2, tokenizers<=0.23.0), which
# kvplug's own .venv/ cannot hold.  Those pins go into .venv-kvpress; torch and every
# other dependency come from .venv/ (a .pth file), so both run the same CPU torch;
# kvplug itself is installed (editable, no dependencies) for the suite's prompts and scoring.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || { echo "run scripts/setup.sh first (.venv/ is missing)" >&2; exit 1; }
[ -x .venv-kvpress/bin/python ] || .venv/bin/python -m venv .venv-kvpress
.venv-kvpress/bin/python -m pip install -q --no-deps kvpress==0.5.5 transformers==5.2.0 \
  "huggingface-hub>=1.3,<2" "tokenizers>=0.22,<=0.23.0" peft==0.21.2 fire==0.6.0 termcolor \
  "cachetools<6" "pandas<3" typer-slim
.venv-kvpress/bin/python -m pip install -q --no-deps -e .   # the suite's prompts and scoring
main_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
peer_site=$(.venv-kvpress/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$main_site" > "$peer_site/zz_kvplug_venv.pth"    # after its own packages
.venv-kvpress/bin/python -c "import kvpress, transformers, torch; \
print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', \
'transformers', transformers.__version__, 'torch', torch.__version__)"
