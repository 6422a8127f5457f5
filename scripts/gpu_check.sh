#!/usr/bin/env bash
# GPU check of the evict backend, one command on any CUDA machine:
#   bash scripts/gpu_check.sh            # GPU tests (kernels, Triton attention, end to end), then the
#                                        # benchmark (results in benchmarks/results/)
# Environment: PYTHON (default python3), ADAKV_SANITIZE=1 also runs the kernel tests under
# compute-sanitizer (memcheck), BENCH_ARGS overrides the benchmark's arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import adakv.presses" 2>/dev/null; then
  # adakv maps several root folders into one package, so it must be installed (no network needed).
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
fi
"$PYTHON" -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device';
print('device', torch.cuda.get_device_name(), '| torch', torch.__version__, '| transformers', transformers.__version__)"

echo "== GPU tests"
export PYTHONUNBUFFERED=1
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton_decode.py tests/test_gpu.py

if [[ "${ADAKV_SANITIZE:-0}" == "1" ]]; then
  echo "== compute-sanitizer (memcheck) on the kernel tests"
  compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "kernel or flat_layer"
  echo "== compute-sanitizer (memcheck) on the Triton attention tests"
  compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton_decode.py -k "fp32 and 1-64-4-3 or splits"
fi

echo "== benchmark"
# shellcheck disable=SC2086
"$PYTHON" benchmarks/bench_evict.py ${BENCH_ARGS:---layers 8}
