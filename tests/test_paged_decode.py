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
from conftest import vllm_python

from adakv.kernels.paged_decode import (
    EMPTY_ROW,
    DecodePlan,
    decode_plan,
    packed_decode_attention,
    packed_decode_reference,
)
from adakv.runtimes.vllm.layout import compressed_attention, pack_layer

ROOT = Path(__file__).resolve().parents[1]


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
        infos.append([1 - row, row, prompt_len, row])  # query tokens in the other order
    query = torch.randn(2, kv_heads * group, head_dim)
    out = torch.zeros_like(query)
    rows_info, seq_lens = torch.tensor(infos, dtype=torch.int32), torch.tensor([33, 22], dtype=torch.int32)
    packed_decode_reference(query, key_cache, value_cache, table, seq_lens, rows_info, torch.stack(offsets), 0.5, out)
    for row, (prompt_len, seq_len) in enumerate(lengths):
        token = 1 - row
        expected = compressed_attention(
            query[token : token + 1], torch.tensor([seq_len - 1]), key_cache, value_cache, table[row].long(),
            packings[row], prompt_len, 0.5,
        )  # fmt: skip
        torch.testing.assert_close(out[token], expected[0])


def test_dense_and_empty_rows_of_the_reference():
    """A dense row (prompt_len 0, the zero offset row) attends every token of its pages; an empty row
    (a CUDA graph's padding) writes zeros."""
    torch.manual_seed(1)
    kv_heads, group, head_dim, block_size = 2, 2, 8, 4
    cache = torch.randn(16, block_size, kv_heads, 2 * head_dim)
    key_cache, value_cache = cache.transpose(1, 2).split(head_dim, dim=-1)
    table = torch.randperm(16)[:10].int().view(2, 5)
    query = torch.randn(2, kv_heads * group, head_dim)
    out = torch.full_like(query, float("nan"))
    rows_info = torch.tensor([[0, 0, 0, 0], [1, 1, EMPTY_ROW, 0]], dtype=torch.int32)
    packed_decode_reference(
        query, key_cache, value_cache, table, torch.tensor([19, 7], dtype=torch.int32), rows_info,
        torch.zeros(1, kv_heads + 1, dtype=torch.int32), 0.5, out,
    )  # fmt: skip
    slots = torch.arange(19)
    blocks, within = table[0].long()[slots // block_size], slots % block_size
    for head in range(kv_heads):
        keys, values = key_cache[blocks, head, within], value_cache[blocks, head, within]
        q = query[0, head * group : (head + 1) * group]
        torch.testing.assert_close(out[0, head * group : (head + 1) * group], (q @ keys.T * 0.5).softmax(-1) @ values)
    assert out[1].eq(0).all()


def test_plan_depends_on_the_batch_shape_only():
    assert decode_plan(rows=1, kv_heads=8, num_sms=132) == DecodePlan(programs_per_row=264)  # 2 per SM
    assert decode_plan(rows=8, kv_heads=8, num_sms=132).programs_per_row == 33
    # 96 rows already fill the GPU: at least twice the heads, so a row's chunks (at most programs_per_row -
    # kv_heads, plus one partial chunk per head) always have a program
    assert decode_plan(rows=96, kv_heads=8, num_sms=132).programs_per_row == 16
    assert DecodePlan(3).min_chunk == 256
    assert (DecodePlan(3).num_warps, DecodePlan(3).num_stages) == (None, None)  # block_sizes' choice, as measured
    assert decode_plan(rows=1, kv_heads=8, num_sms=132, num_warps=8, num_stages=2) == DecodePlan(264, 256, 8, 2)


@pytest.mark.parametrize(
    "plan", [DecodePlan(8), DecodePlan(9, min_chunk=0), DecodePlan(9, num_warps=3), DecodePlan(9, num_stages=0)]
)
def test_a_plan_the_kernel_cannot_run_is_refused(plan):
    with pytest.raises(ValueError, match="programs_per_row must exceed"):
        packed_decode_attention(torch.zeros(1, 16, 8), torch.zeros(1, 8, 4, 8), torch.zeros(1, 8, 4, 8),
                                torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                                torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 9, dtype=torch.int32), 1.0,
                                torch.zeros(1, 16, 8), plan)  # fmt: skip


def test_triton_kernel_matches_the_reference_in_the_interpreter():
    python = vllm_python("the Triton kernel's interpreter test needs the vLLM environment")
    run = subprocess.run(
        [str(python), str(ROOT / "tests" / "vllm_engine" / "check_paged_kernel.py")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 8
    for result in results:
        assert result["max_difference"] < 1e-5, result


def test_the_kernel_benchmark_runs_and_matches_the_reference_in_the_interpreter(tmp_path):
    """benchmarks/bench_paged_decode.py --smoke (CPU, Triton's interpreter, one tiny case, packed, uneven and dense),
    with a changed copy of the kernels' file (outputs doubled) as the baseline measured beside them: its rows
    must be the changed kernels', not the current ones."""
    python = vllm_python("the benchmark's smoke run needs the vLLM environment's Triton")
    baseline = tmp_path / "copy.py"
    source = (ROOT / "adakv" / "kernels" / "triton_pages.py").read_text()
    doubled = "tl.store(pointers, (2 * acc).to(Out.dtype.element_ty)"
    assert source.count("tl.store(pointers, acc.to(Out.dtype.element_ty)") == 1
    baseline.write_text(source.replace("tl.store(pointers, acc.to(Out.dtype.element_ty)", doubled))
    run = subprocess.run(
        [str(python), str(ROOT / "benchmarks" / "bench_paged_decode.py"), "--smoke", "--out", str(tmp_path),
         "--baseline", str(baseline)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    data = json.loads((tmp_path / "paged_decode_smoke_cpu.json").read_text())
    assert [(row["layout"], row["kernel"]) for row in data["rows"]] == [
        (layout, kernel) for layout in ("packed", "uneven", "dense") for kernel in ("current", "baseline copy")
    ]
    assert all(row["limit_us"] > 0 for row in data["rows"])
    assert all((row["max_difference"] < 1e-5) == (row["kernel"] == "current") for row in data["rows"])
