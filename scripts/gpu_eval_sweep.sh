#!/usr/bin/env bash
# The long-context sweep (scripts/gpu_eval_sweep.py) on a CUDA machine without network: the environment of
# scripts/gpu_real_model.sh (needlehaystack from .gguf_b/, the model built in earlier calls of the same warm
# machine: docs/RESULTS.md, "Real instruct models"), then one call of the sweep.
#   usage: OUT_DIR=$OUT bash scripts/gpu_eval_sweep.sh --profile       (first: one sample's phases, for the estimates)
#          ADAKV_COMMIT=<sha> OUT_DIR=$OUT bash scripts/gpu_eval_sweep.sh --next   (again until it says complete)
#          bash scripts/gpu_eval_sweep.sh --list | --status
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_site.sh
python3 -c "import torch; print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
exec python3 scripts/gpu_eval_sweep.py "$@"
