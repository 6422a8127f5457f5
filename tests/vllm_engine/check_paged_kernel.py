"""Runs adakv's packed-page decode kernel (Triton; on CPU through TRITON_INTERPRET=1) against its torch
reference on random packings; prints one JSON line per case: its settings and the largest difference.
Run by tests/test_paged_decode.py in the vLLM environment, which has Triton."""

from __future__ import annotations

import json
import sys

import torch

from adakv.kernels.paged_decode import DecodePlan, decode_plan, packed_decode_attention, packed_decode_reference
from adakv.runtimes.vllm.layout import pack_layer


def case(kv_heads: int, group: int, head_dim: int, block_size: int, lengths, plan, seed: int) -> dict:
    torch.manual_seed(seed)
    num_blocks = 4 * sum(-(-seq // block_size) for _, seq in lengths)
    cache = torch.randn(num_blocks, block_size, kv_heads, 2 * head_dim)  # vLLM's NHD pages, keys | values
    key_cache, value_cache = cache.transpose(1, 2).split(head_dim, dim=-1)
    width = max(-(-seq // block_size) for _, seq in lengths)
    table = torch.stack([torch.randperm(num_blocks)[:width] for _ in lengths]).int()
    infos, offsets = [], []
    for row, (prompt_len, seq_len) in enumerate(lengths):
        keep = torch.rand(kv_heads, prompt_len) < torch.rand(kv_heads, 1)  # heads keep different shares
        keep[:, -1] = True
        packed = pack_layer(key_cache, value_cache, table[row], keep, -(-int(keep.sum()) // kv_heads))
        offsets.append(packed.offset_row())
        infos.append([row, row, prompt_len, seq_len, row])
    query = torch.randn(len(lengths), kv_heads * group, head_dim)
    rows_info, offset_table = torch.tensor(infos, dtype=torch.int32), torch.stack(offsets)
    expected, out = torch.zeros_like(query), torch.full_like(query, float("nan"))
    packed_decode_reference(query, key_cache, value_cache, table, rows_info, offset_table, 0.2, expected)
    packed_decode_attention(query, key_cache, value_cache, table, rows_info, offset_table, 0.2, out, plan)
    settings = dict(kv_heads=kv_heads, group=group, head_dim=head_dim, block_size=block_size, plan=plan.__dict__)
    return {**settings, "max_difference": float((out - expected).abs().max())}


def main() -> None:
    lengths = [(300, 305), (90, 91), (17, 40)]
    longest = max(prompt + seq for prompt, seq in lengths)
    cases = [
        case(2, 3, 16, 16, lengths, DecodePlan(chunk=64, num_splits=-(-longest // 64)), 0),
        case(4, 1, 32, 16, lengths, decode_plan(3, 4, 100, longest, 1, 64), 1),
        case(1, 4, 8, 32, lengths[:1], DecodePlan(chunk=128, num_splits=-(-longest // 128)), 2),
    ]
    for result in cases:
        print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
