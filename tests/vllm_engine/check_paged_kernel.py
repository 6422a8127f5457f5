"""Runs adakv's packed-page decode kernel (Triton; on CPU through TRITON_INTERPRET=1) against its torch
reference on random packings; prints one JSON line per case: its settings and the largest difference.
Run by tests/test_paged_decode.py in the vLLM environment, which has Triton."""

from __future__ import annotations

import json
import sys

import torch

from adakv.kernels.paged_decode import (
    EMPTY_ROW,
    DecodePlan,
    decode_plan,
    packed_decode_attention,
    packed_decode_reference,
)
from adakv.runtimes.vllm.layout import pack_layer


def case(kv_heads, group, head_dim, block_size, lengths, plan, seed, extra_rows=(), uneven=False) -> dict:
    """lengths: (prompt_len, seq_len) of compressed rows; extra_rows: "dense" (all tail, seq_len 50) or
    "empty" (a CUDA graph's padding) rows after them; uneven: head 0 keeps its whole prompt and the others
    a few pairs each (Ada-KV's extreme), else each head a random share."""
    torch.manual_seed(seed)
    num_blocks = 4 * sum(-(-seq // block_size) for _, seq in lengths) + 16
    cache = torch.randn(num_blocks, block_size, kv_heads, 2 * head_dim)  # vLLM's NHD pages, keys | values
    key_cache, value_cache = cache.transpose(1, 2).split(head_dim, dim=-1)
    width = max(-(-seq // block_size) for _, seq in lengths)
    rows = len(lengths) + len(extra_rows)
    table = torch.stack([torch.randperm(num_blocks)[:width] for _ in range(rows)]).int()
    infos, offsets, seq_lens = [], [torch.zeros(kv_heads + 1, dtype=torch.int32)], []
    for row, (prompt_len, seq_len) in enumerate(lengths):
        keep = torch.rand(kv_heads, prompt_len) < torch.rand(kv_heads, 1)  # heads keep different shares
        if uneven:
            keep[0], keep[1:] = True, torch.rand(kv_heads - 1, prompt_len) < 0.02
        keep[:, -1] = True
        packed = pack_layer(key_cache, value_cache, table[row], keep, -(-int(keep.sum()) // kv_heads))
        offsets.append(packed.offset_row())
        infos.append([row, row, prompt_len, row + 1])
        seq_lens.append(seq_len)
    for row, kind in enumerate(extra_rows, start=len(lengths)):
        infos.append([row, row, 0 if kind == "dense" else EMPTY_ROW, 0])
        seq_lens.append(50)
    query = torch.randn(rows, kv_heads * group, head_dim)
    rows_info, offset_table = torch.tensor(infos, dtype=torch.int32), torch.stack(offsets)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    expected, out = torch.zeros_like(query), torch.full_like(query, float("nan"))
    packed_decode_reference(query, key_cache, value_cache, table, seq_lens, rows_info, offset_table, 0.2, expected)
    packed_decode_attention(query, key_cache, value_cache, table, seq_lens, rows_info, offset_table, 0.2, out, plan)
    settings = dict(kv_heads=kv_heads, group=group, head_dim=head_dim, block_size=block_size, plan=plan.__dict__)
    return {**settings, "extra_rows": list(extra_rows), "uneven": uneven,
            "max_difference": float((out - expected).abs().max())}  # fmt: skip


def main() -> None:
    lengths = [(300, 305), (90, 91), (17, 40)]
    cases = [
        case(2, 3, 16, 16, lengths, DecodePlan(programs_per_row=12, min_chunk=16), 0),  # several chunks per head
        case(4, 1, 32, 16, lengths, decode_plan(3, 4, 1), 1),  # the plan of a one-multiprocessor GPU
        case(1, 4, 8, 32, lengths[:1], DecodePlan(programs_per_row=3, min_chunk=64), 2),
        case(2, 2, 16, 16, lengths[1:], DecodePlan(programs_per_row=4, min_chunk=16), 3, extra_rows=("dense", "empty")),
        # one program per head: programs_per_row = kv_heads + 1, the fewest the plan allows
        case(2, 3, 16, 16, lengths, DecodePlan(programs_per_row=3, min_chunk=16), 4),
        # one long head and short ones: the long head takes most of the row's programs; with kv_heads + 1
        # programs a chunk of total / programs_per_row would leave the long head's last chunks no program
        case(4, 2, 16, 16, lengths, DecodePlan(programs_per_row=5, min_chunk=16), 5, uneven=True),
        case(4, 2, 16, 16, lengths, DecodePlan(64, min_chunk=16), 6, uneven=True, extra_rows=("empty",)),
        # a head of 41 chunks: the combine merges them in tiles of SPLIT_TILE (16), the last one partial
        case(2, 2, 16, 16, [(2600, 2604)], DecodePlan(80, min_chunk=16), 7, uneven=True),
    ]
    for result in cases:
        print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
