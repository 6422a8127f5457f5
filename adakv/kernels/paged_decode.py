"""Decode attention over packed pages: each compressed request's kept pairs packed into its token
slots, then its tail tokens (the vLLM runtime's layout, adakv/runtimes/vllm/layout.py).

`packed_decode_attention` launches the Triton kernels of adakv.kernels.triton_pages (CUDA, or Triton's
interpreter on CPU with TRITON_INTERPRET=1); `packed_decode_reference` is the same computation in torch.

Shapes: query and out (tokens, num_heads, head_dim); key_cache, value_cache (num_blocks, kv_heads,
block_size, head_dim) views (unit last stride); block_table (table_rows, max_blocks) int32; rows_info
(rows, 5) int32 = (query token index, block-table row, prompt_len, seq_len, offset-table row);
offset_table (requests, kv_heads + 1) int32: head h's packed pairs are [offsets[h], offsets[h + 1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .triton_decode import LOG2_E, MIN_KEYS_PER_SPLIT, PROGRAMS_PER_SM, block_sizes


@dataclass(frozen=True)
class DecodePlan:
    """How the keys are split: every (row, KV head) sequence in chunks of `chunk` keys, `num_splits`
    programs per sequence (enough for the longest; programs past a sequence's end return)."""

    chunk: int
    num_splits: int


def decode_plan(rows: int, kv_heads: int, mean_length: int, max_length: int, num_sms: int, block_n: int) -> DecodePlan:
    """Chunks sized so that the work (rows x heads x mean_length keys) fills ~PROGRAMS_PER_SM programs
    per multiprocessor; splits cover `max_length`, an upper bound of any head's sequence."""
    sequences = max(rows * kv_heads, 1)
    target = max(num_sms * PROGRAMS_PER_SM, 1)
    chunk = max(MIN_KEYS_PER_SPLIT, -(-mean_length * sequences // target))
    chunk = -(-chunk // block_n) * block_n
    return DecodePlan(chunk=chunk, num_splits=max(1, -(-max_length // chunk)))


@lru_cache(maxsize=None)
def _kernels():
    from . import triton_pages

    return triton_pages


def packed_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    rows_info: torch.Tensor,
    offset_table: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    plan: DecodePlan,
) -> None:
    """Write `out[token]` for every row of rows_info: its query token's attention over its packed pairs
    and tail tokens."""
    rows = rows_info.shape[0]
    if rows == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // kv_heads
    tiles = dict(block_sizes(group, head_dim, query.dtype))  # one program holds a head's whole GQA group
    if group > tiles["BLOCK_M"]:
        raise ValueError(f"{group} query heads per KV head: the packed-page decode kernel takes at most {tiles['BLOCK_M']}")
    if plan.chunk % tiles["BLOCK_N"]:
        raise ValueError(f"the plan's chunk ({plan.chunk}) must be a multiple of {tiles['BLOCK_N']} keys")
    kernels = _kernels()
    partial_out = torch.empty(
        rows * kv_heads * plan.num_splits * tiles["BLOCK_M"], head_dim, dtype=torch.float32, device=query.device
    )
    partial_lse = torch.empty(partial_out.shape[0], dtype=torch.float32, device=query.device)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    kernels.partial_attention[(rows, kv_heads, plan.num_splits)](
        query, key_cache, value_cache, block_table, rows_info, offset_table, partial_out, partial_lse,
        query.stride(0), query.stride(1), *key_cache.stride()[:3], *value_cache.stride()[:3], block_table.stride(0),
        scale * LOG2_E, kv_heads, block_size, plan.chunk, plan.num_splits,
        GROUP=group, HEAD_DIM=head_dim, DOT_PRECISION=precision, **tiles,
    )  # fmt: skip
    kernels.combine_splits[(rows, kv_heads)](
        rows_info, offset_table, partial_out, partial_lse, out, out.stride(0), out.stride(1),
        kv_heads, plan.chunk, plan.num_splits,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=tiles["BLOCK_M"], BLOCK_D=tiles["BLOCK_D"], num_warps=4,
    )  # fmt: skip


def packed_decode_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    rows_info: torch.Tensor,
    offset_table: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """`packed_decode_attention` in torch, one row and head at a time (tests, and CPU)."""
    kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = query.shape[1] // kv_heads
    for token, table_row, prompt_len, seq_len, offset_row in rows_info.tolist():
        pages = block_table[table_row].long()
        offsets = offset_table[offset_row].long()
        for head in range(kv_heads):
            pair = torch.arange(int(offsets[head]), int(offsets[head + 1]), device=query.device)
            tail = torch.arange(prompt_len, seq_len, device=query.device)
            slots = torch.cat([pair // kv_heads, tail])
            lanes = torch.cat([pair % kv_heads, torch.full_like(tail, head)])
            blocks, within = pages[slots // block_size], slots % block_size
            keys = key_cache[blocks, lanes, within].float()
            values = value_cache[blocks, lanes, within].float()
            q = query[token, head * group : (head + 1) * group].float()
            weights = (q @ keys.T * scale).softmax(-1)
            out[token, head * group : (head + 1) * group] = (weights @ values).to(out.dtype)
