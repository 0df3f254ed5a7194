#!/usr/bin/env bash
# On the lent GPU machine (no network): install the wheels of bench/.gpu-wheels (made here by
# bench/gpu_wheels.sh; carry them: run(carry=["bench/.gpu-wheels"])) over the image's torch, then
# run bench/gpu.py once, its results and logs under $OUT. Extra arguments go to bench/gpu.py.
#   bash bench/gpu_run.sh                 # the full run (about 7 minutes on one H200)
#   bash bench/gpu_run.sh --dry-run       # the same at tiny shapes (CPU or GPU, about 3 minutes)
#   bash bench/gpu_run.sh --tier          # instead: the gpu test tier (pytest -m gpu), under TIER_S seconds
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
SITE=/tmp/site
if [ ! -f "$SITE/.installed" ]; then
  python3 -m pip install --quiet --no-index --no-deps --target "$SITE" bench/.gpu-wheels/*.whl \
    2>&1 | tail -5 && touch "$SITE/.installed"
fi
export PYTHONPATH="$SITE:$PWD" HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv > "$OUT/nvidia-smi.txt" 2>&1 || true
python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
if [ "${1:-}" = "--tier" ]; then
  shift
  timeout "${TIER_S:-300}" python3 -m pytest -m gpu -q -p no:cacheprovider tests/stage/test_gpu.py "$@" 2>&1 \
    | tee "$OUT/gpu-tier.txt"
  exit "${PIPESTATUS[0]}"
fi
python3 bench/gpu.py "$@" 2>&1 | tee "$OUT/gpu-console.txt"
