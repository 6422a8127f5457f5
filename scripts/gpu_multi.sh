#!/usr/bin/env bash
# Multi-GPU check on a machine with 2 CUDA devices (device kind nvidia-h200-x2), one command:
#   bash scripts/gpu_multi.sh
# 1. tests: layers split over cuda:0 / cuda:1 by a device_map (every press, both backends) and tensor
#    parallelism (transformers' tp_plan) over NCCL and gloo: keep sets and tokens equal one process's;
# 2. benchmarks/bench_multi_gpu.py under torchrun (TP = 2, 8B shape, dense one-forward prefill vs chunked
#    AdaptivePress(SnapKV) evict at r = 0.75 and 0.875): 128k and 256k in one run, 512k in a second (each
#    meant to stay inside a 10-minute command), the second fitting the longest context over both.
# Environment: PYTHON (default python3), BENCH_ARGS (extra arguments for both benchmark runs),
# SKIP_TESTS=1 / SKIP_BENCH=1. NVLink multicast stays off (exported below and set again by the benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

if ! "$PYTHON" -c "import adakv.presses" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
fi
"$PYTHON" -c "import torch, transformers, accelerate; n = torch.cuda.device_count(); assert n >= 2, f'needs 2 CUDA devices, found {n}';
print(n, 'x', torch.cuda.get_device_name(), '| torch', torch.__version__, '| transformers', transformers.__version__)"

if [[ "${SKIP_TESTS:-0}" != "1" ]]; then
  echo "== multi-GPU tests"
  timeout 900 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_multi_gpu.py tests/test_distributed.py
fi

if [[ "${SKIP_BENCH:-0}" != "1" ]]; then
  OUT_DIR=${OUT_DIR:-benchmarks/results}
  echo "== bench_multi_gpu.py 128k, 256k"
  # shellcheck disable=SC2086
  timeout 590 "$PYTHON" -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_multi_gpu.py \
    --contexts 131072 262144 --tag 128k-256k --out "$OUT_DIR" ${BENCH_ARGS:-}
  echo "== bench_multi_gpu.py 512k"
  first=$(ls "$OUT_DIR"/bench_multi_gpu_*_128k-256k.json | head -1)
  # shellcheck disable=SC2086
  timeout 590 "$PYTHON" -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_multi_gpu.py \
    --contexts 524288 --tag 512k --fit-with "$first" --out "$OUT_DIR" ${BENCH_ARGS:-}
fi
