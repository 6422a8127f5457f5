"""adakv's Triton kernels on CPU: the kernel test modules, which skip in this environment (no Triton here, and
its numpy is too new for Triton's interpreter), run under Triton's interpreter (TRITON_INTERPRET=1, fp32) in the
vLLM environment (scripts/setup_vllm.sh: torch 2.11 and Triton 3.6, the GPU machine's versions). So CI checks the
flat decode, fp8 append, GEMV, fused elementwise and KVzip scoring kernels against their torch references.
ADAKV_SKIP_VLLM=1 skips this, saying so; where Triton is importable here, those modules ran in this session."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import vllm_python

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = (
    "test_flat_decode_kernel.py", "test_fp8_cache.py", "test_fused_elementwise.py", "test_gemv_linears.py",
    "test_triton_gemv.py", "test_kvzip_kernels.py",
)  # fmt: skip
FEWEST_PASSED = 150  # 180 passed when written; far fewer means the kernels' tests were skipped there too


def test_the_triton_kernel_tests_pass_under_the_interpreter():
    if importlib.util.find_spec("triton") is not None:
        pytest.skip("Triton is installed here: the kernel modules ran in this session")
    python = vllm_python("the interpreted Triton kernel tests need the vLLM environment's Triton")
    run = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *(f"tests/{m}" for m in KERNEL_MODULES)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= FEWEST_PASSED, summary
