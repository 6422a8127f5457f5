#!/usr/bin/env bash
# Multi-GPU check on a machine with 2 CUDA devices (device kind nvidia-h200-x2):
#   bash scripts/gpu_multi.sh                 # everything (~15 min: longer than one 10-minute device command)
#   PART=tests bash scripts/gpu_multi.sh      # the tests alone (~5 min)
#   PART=bench1 bash scripts/gpu_multi.sh     # benchmark, 128k and 256k (~5 min with the kernel build)
#   PART=bench2 bash scripts/gpu_multi.sh     # benchmark, 512k, fitting the longest context over both runs
# tests: layers split over cuda:0 / cuda:1 by a device_map (every press, both backends) and tensor
#   parallelism (transformers' tp_plan) over NCCL and gloo: kept sets and tokens equal one process's.
# bench: benchmarks/bench_multi_gpu.py under torchrun (TP = 2, 8B shape, dense one-forward prefill vs chunked
#   AdaptivePress(SnapKV) evict at r = 0.75 and 0.875), results in $OUT_DIR (default benchmarks/results).
# Environment: PYTHON (default python3), BENCH_ARGS (extra arguments for the benchmark runs), OUT_DIR.
# NVLink multicast stays off (exported here and set again by the benchmark itself).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PART=${PART:-all}
OUT_DIR=${OUT_DIR:-benchmarks/results}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

if ! "$PYTHON" -c "import adakv.presses" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
fi
"$PYTHON" -c "import torch, transformers, accelerate; n = torch.cuda.device_count(); assert n >= 2, f'needs 2 CUDA devices, found {n}';
print(n, 'x', torch.cuda.get_device_name(), '| torch', torch.__version__, '| transformers', transformers.__version__)"

bench() {  # torchrun the benchmark; killed (with its ranks) if it outlives a device command
  # shellcheck disable=SC2086
  timeout 590 "$PYTHON" -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_multi_gpu.py --out "$OUT_DIR" "$@" ${BENCH_ARGS:-}
}

if [[ "$PART" == "all" || "$PART" == "tests" ]]; then
  echo "== multi-GPU tests"
  timeout 590 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_multi_gpu.py tests/test_distributed.py
fi
if [[ "$PART" == "all" || "$PART" == "bench1" ]]; then
  echo "== bench_multi_gpu.py 128k, 256k"
  bench --contexts 131072 262144 --tag 128k-256k
fi
if [[ "$PART" == "all" || "$PART" == "bench2" ]]; then
  echo "== bench_multi_gpu.py 512k"
  earlier=$(ls "$OUT_DIR"/bench_multi_gpu_*_128k-256k.json 2>/dev/null | head -1 || true)
  bench --contexts 524288 --tag 512k ${earlier:+--fit-with "$earlier"}
fi
