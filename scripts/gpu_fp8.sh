#!/usr/bin/env bash
# The fp8 flat cache (a press's kv_dtype="float8_e4m3fn") on one CUDA GPU of compute capability >= 8.9 (H200):
#   ADAKV_COMMIT=<sha> OUT_DIR=$OUT bash scripts/gpu_fp8.sh            # everything, one call (~8 min)
#   PART=tests|memory|decode|tune ADAKV_COMMIT=<sha> OUT_DIR=$OUT bash scripts/gpu_fp8.sh   # one part (if split)
# tests:  tests/test_fp8_gpu.py (Triton attention over fp8 rows vs the float64 reference, the append kernel's
#         codes vs torch's, a model decoding from fp8 eagerly, from CUDA graphs and fused) and the CPU fp8 tests
#         (~2 min with the Triton builds)
# memory: benchmarks/bench_prefill_memory.py, AdaptivePress(SnapKV 0.75) with the four speed switches, bf16 and
#         fp8 KV at 1x32k, 1x128k and 8x32k: KV GiB (target fp8 <= 0.52x bf16) and decode against its bandwidth
#         limit (target <= 1.3x) through model.generate (~4 min)
# decode: benchmarks/bench_decode_limit.py, adaptive-snapkv eager and graph rows, bf16 and fp8, same cases,
#         the fp8 rows' limit counting e4m3 codes and scales (~2.5 min)
# tune:   benchmarks/tune_decode_attention.py --kv-dtype float8_e4m3fn: one layer's Triton decode over fp8 rows
#         per key step (up to 256) x warps x stages x splits against its copy-bandwidth floor, to find why fp8
#         decode is no faster than bf16's (~3 min; not part of "all")
# Results go to $OUT_DIR (default benchmarks/results); ADAKV_COMMIT names the commit in their provenance.
# Environment: PYTHON (default python3), PART (default all), PYTEST_K (a pytest -k expression for the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PART=${PART:-all}
OUT_DIR=${OUT_DIR:-benchmarks/results}
CASES=(1x32768 1x131072 8x32768)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"

if ! "$PYTHON" -c "import adakv.presses" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
fi
"$PYTHON" -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device';
print('device', torch.cuda.get_device_name(), 'sm', torch.cuda.get_device_capability(), '| torch', torch.__version__,
      '| transformers', transformers.__version__)"

if [[ "$PART" == "all" || "$PART" == "tests" ]]; then
  echo "== fp8 tests"
  timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_fp8_gpu.py tests/test_fp8_cache.py ${PYTEST_K:+-k "$PYTEST_K"}
fi
if [[ "$PART" == "all" || "$PART" == "memory" ]]; then
  echo "== bench_prefill_memory.py, bf16 and fp8 KV"
  timeout 330 "$PYTHON" benchmarks/bench_prefill_memory.py --cases "${CASES[@]}" --methods adakv-snapkv \
    --kv-dtypes bfloat16 float8_e4m3fn --decode-steps 16 --decode-warmup 4 --out "$OUT_DIR" --tag _fp8 \
    || echo "bench_prefill_memory.py stopped (exit $?): its rows so far are in $OUT_DIR"
fi
if [[ "$PART" == "all" || "$PART" == "decode" ]]; then
  echo "== bench_decode_limit.py, bf16 and fp8 KV"
  timeout 240 "$PYTHON" benchmarks/bench_decode_limit.py --cases "${CASES[@]}" --presses adaptive-snapkv \
    --kv-dtypes bfloat16 float8_e4m3fn --ratios 0.75 --joined --no-dense --steps 32 --warmup 4 \
    --out "$OUT_DIR" --tag _fp8 \
    || echo "bench_decode_limit.py stopped (exit $?): its rows so far are in $OUT_DIR"
fi
if [[ "$PART" == "tune" ]]; then
  echo "== tune_decode_attention.py, fp8 rows"
  timeout 400 "$PYTHON" benchmarks/tune_decode_attention.py --kv-dtype float8_e4m3fn --out "$OUT_DIR" \
    || echo "tune_decode_attention.py stopped (exit $?)"
fi
