"""The packed-page decode attention of the vLLM runtime: its torch reference against the layout's own
(tests/test_vllm_layout.py checks that one against a dense reference), and the Triton kernel against the
reference through Triton's interpreter (TRITON_INTERPRET=1) in the vLLM environment, which has Triton.
ADAKV_SKIP_VLLM=1 skips the kernel part, saying so."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from adakv.kernels.paged_decode import DecodePlan, decode_plan, packed_decode_reference
from adakv.runtimes.vllm.layout import compressed_attention, pack_layer

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("ADAKV_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def test_reference_equals_the_layouts_attention_for_every_row():
    torch.manual_seed(0)
    kv_heads, group, head_dim, block_size, num_blocks = 2, 2, 8, 4, 64
    cache = torch.randn(num_blocks, block_size, kv_heads, 2 * head_dim)
    key_cache, value_cache = cache.transpose(1, 2).split(head_dim, dim=-1)
    table = torch.stack([torch.randperm(num_blocks)[:20], torch.randperm(num_blocks)[:20]]).int()
    lengths, infos, offsets, packings = [(30, 33), (21, 22)], [], [], []
    for row, (prompt_len, seq_len) in enumerate(lengths):
        keep = torch.rand(kv_heads, prompt_len) < 0.5
        packed = pack_layer(key_cache, value_cache, table[row], keep, -(-int(keep.sum()) // kv_heads))
        packings.append(packed)
        offsets.append(packed.offset_row())
        infos.append([1 - row, row, prompt_len, seq_len, row])  # query tokens in the other order
    query = torch.randn(2, kv_heads * group, head_dim)
    out = torch.zeros_like(query)
    rows_info = torch.tensor(infos, dtype=torch.int32)
    packed_decode_reference(query, key_cache, value_cache, table, rows_info, torch.stack(offsets), 0.5, out)
    for row, (prompt_len, seq_len) in enumerate(lengths):
        token = 1 - row
        expected = compressed_attention(
            query[token : token + 1], torch.tensor([seq_len - 1]), key_cache, value_cache, table[row].long(),
            packings[row], prompt_len, 0.5,
        )  # fmt: skip
        torch.testing.assert_close(out[token], expected[0])


def test_plan_covers_the_longest_sequence_in_whole_key_steps():
    plan = decode_plan(rows=1, kv_heads=8, mean_length=8192, max_length=65536 + 300, num_sms=132, block_n=64)
    assert plan.chunk % 64 == 0 and plan.chunk >= 256
    assert plan.chunk * plan.num_splits >= 65536 + 300
    wide = decode_plan(rows=96, kv_heads=8, mean_length=8192, max_length=65536, num_sms=132, block_n=64)
    assert wide.chunk > plan.chunk  # many rows: fewer, longer chunks
    assert DecodePlan(64, 3) == DecodePlan(64, 3)


def test_triton_kernel_matches_the_reference_in_the_interpreter():
    if os.environ.get("ADAKV_SKIP_VLLM") == "1":
        pytest.skip("ADAKV_SKIP_VLLM=1: the Triton kernel's interpreter test needs the vLLM environment")
    if not VLLM_PYTHON.exists():
        pytest.fail(f"no vLLM environment at {VLLM_PYTHON}: run `bash scripts/setup_vllm.sh` (or set ADAKV_SKIP_VLLM=1)")
    run = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_engine" / "check_paged_kernel.py")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 3
    for result in results:
        assert result["max_difference"] < 1e-5, result
