#!/usr/bin/env bash
# adakv inside vLLM on a CUDA machine (vLLM 0.26.0 importable by $PYTHON, e.g. PYTHONPATH=/tmp/vllm-site
# after .vllm-wheels/install.sh):
#   PART=tests bash scripts/gpu_vllm.sh        # tests/test_vllm_cuda.py: the CUDA backend on a small model (~5 min)
#   PART=checkpoint bash scripts/gpu_vllm.sh   # saves the 8B shape's config to $CHECKPOINT (vLLM draws the weights)
#   PART=dense bash scripts/gpu_vllm.sh        # benchmarks/bench_serve_vllm.py --method dense
#   PART=adakv BENCH_ARGS="--ratios 0.75" bash scripts/gpu_vllm.sh   # the same with adakv's plugin
#   PART=adakv BENCH_ARGS="--requests 0 --full-decode-graphs" ...      # batch-1 rows with full decode graphs
#   PART=dense BENCH_ARGS="--requests 0 --batch1 --decode-concurrency 24" ...  # decode alone at 24 x 32k
# Rows merge into the --out folder's serve_vllm_<GPU>.json: on a device copy of the tree, first
# `cp benchmarks/results/serve_vllm_NVIDIA_H200.json $OUT/` and pass `--out $OUT` in BENCH_ARGS (each call; a later
# call's $OUT starts empty), so that the returned file holds the committed rows beside the new ones.
# Each benchmark row is saved as it is measured (a run cut short by a time limit keeps its rows); an
# engine start takes ~1 min on the 8B shape, each 96 x 32k saturation run several more. The first engine on
# a fresh machine pays over 2 more minutes once (measured: a dense engine still starting 2 min after its
# graph capture; JIT caches that later engines find): run PART=tests (small engines, ~3.5 min) first.
# Environment: PYTHON (default python3), PYTEST_K (a pytest -k expression), CHECKPOINT (default /tmp/llama8b), BENCH_ARGS (extra arguments
# for the benchmark), ADAKV_COMMIT (the commit this tree is, for the results' provenance).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CHECKPOINT=${CHECKPOINT:-/tmp/llama8b}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export PYTHONUNBUFFERED=1
if ! "$PYTHON" -c "import importlib.metadata as m; m.version('adakv')" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .   # registers the vLLM plugin's entry point
fi
"$PYTHON" -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA device';
print('device', torch.cuda.get_device_name(), '| torch', torch.__version__, '| vllm', vllm.__version__)"
case "${PART:-tests}" in
  tests)
    ADAKV_VLLM_PYTHON=$(command -v "$PYTHON") "$PYTHON" -m pytest -q -s -p no:cacheprovider tests/test_vllm_cuda.py ${PYTEST_K:+-k "$PYTEST_K"} ;;
  checkpoint)
    [ -f "$CHECKPOINT/config.json" ] || "$PYTHON" benchmarks/bench_serve_vllm.py --make-checkpoint "$CHECKPOINT" ;;
  dense|adakv)
    "$PYTHON" benchmarks/bench_serve_vllm.py --checkpoint "$CHECKPOINT" --method "$PART" ${BENCH_ARGS:-} ;;
  *) echo "PART must be tests, checkpoint, dense or adakv" >&2; exit 2 ;;
esac
