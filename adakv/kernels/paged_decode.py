"""Decode attention over packed pages: each compressed request's kept pairs packed into its token
slots, then its tail tokens (the vLLM runtime's layout, adakv/runtimes/vllm/layout.py).

`packed_decode_attention` launches the Triton kernels of adakv.kernels.triton_pages (CUDA, or Triton's
interpreter on CPU with TRITON_INTERPRET=1); `packed_decode_reference` is the same computation in torch.

Shapes: query and out (tokens, num_heads, head_dim); key_cache, value_cache (num_blocks, kv_heads,
block_size, head_dim) views (unit last stride); block_table (batch_rows, max_blocks) int32; seq_lens
(batch_rows,) int32: tokens in each batch row's cache, the decoded one included; rows_info (rows, 5) int32
= (query token index, batch row, prompt_len, offset-table row, chunk): prompt_len 0 is a dense row (every
token a tail token, with an offset row of zeros), -1 an empty one (a CUDA graph's padding: its output is
zeros); chunk is the row's keys per split (the last split reads to the end). offset_table (table rows,
kv_heads + 1) int32: head h's packed pairs are [offsets[h], offsets[h + 1]).

Everything a launch reads is a device tensor and its grid depends on the number of rows only, so a CUDA
graph captured for a batch size replays with any step's lengths (the chunks change, the splits do not).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .triton_decode import LOG2_E, MIN_KEYS_PER_SPLIT, PROGRAMS_PER_SM, block_sizes


ROW_FIELDS = 5  # rows_info's columns
EMPTY_ROW = -1  # rows_info's prompt_len of a row that attends nothing


@dataclass(frozen=True)
class DecodePlan:
    """How many programs split each (row, KV head) sequence; each row's `chunk` (in rows_info) is its
    longest sequence over these splits, so short rows leave some of their programs idle."""

    num_splits: int


def decode_plan(rows: int, kv_heads: int, num_sms: int) -> DecodePlan:
    """Splits enough for ~PROGRAMS_PER_SM programs per multiprocessor over rows x kv_heads sequences: a
    function of the batch's shape only (a CUDA graph captures it)."""
    sequences = max(rows * kv_heads, 1)
    return DecodePlan(num_splits=max(1, -(-num_sms * PROGRAMS_PER_SM // sequences)))


def split_chunk(longest: int, plan: DecodePlan, block_n: int) -> int:
    """Keys per split of a row whose longest (KV head) sequence is `longest`: at least MIN_KEYS_PER_SPLIT,
    a multiple of block_n, and `plan.num_splits` of them cover it."""
    chunk = max(MIN_KEYS_PER_SPLIT, -(-longest // plan.num_splits))
    return -(-chunk // block_n) * block_n


@lru_cache(maxsize=None)
def _kernels():
    from . import triton_pages

    return triton_pages


def packed_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
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
    kernels = _kernels()
    partial_out = torch.empty(
        rows * kv_heads * plan.num_splits * tiles["BLOCK_M"], head_dim, dtype=torch.float32, device=query.device
    )
    partial_lse = torch.empty(partial_out.shape[0], dtype=torch.float32, device=query.device)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    kernels.partial_attention[(rows, kv_heads, plan.num_splits)](
        query, key_cache, value_cache, block_table, seq_lens, rows_info, offset_table, partial_out, partial_lse,
        query.stride(0), query.stride(1), *key_cache.stride()[:3], *value_cache.stride()[:3], block_table.stride(0),
        scale * LOG2_E, kv_heads, block_size, plan.num_splits,
        GROUP=group, HEAD_DIM=head_dim, DOT_PRECISION=precision, **tiles,
    )  # fmt: skip
    kernels.combine_splits[(rows, kv_heads)](
        seq_lens, rows_info, offset_table, partial_out, partial_lse, out, out.stride(0), out.stride(1),
        kv_heads, plan.num_splits,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=tiles["BLOCK_M"], BLOCK_D=tiles["BLOCK_D"], num_warps=4,
    )  # fmt: skip


def packed_decode_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    rows_info: torch.Tensor,
    offset_table: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """`packed_decode_attention` in torch, one row and head at a time (tests, and CPU)."""
    kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = query.shape[1] // kv_heads
    lengths = seq_lens.tolist()
    for token, batch_row, prompt_len, offset_row, _ in rows_info.tolist():
        if prompt_len == EMPTY_ROW:
            out[token] = 0
            continue
        pages = block_table[batch_row].long()
        offsets = offset_table[offset_row].long()
        for head in range(kv_heads):
            pair = torch.arange(int(offsets[head]), int(offsets[head + 1]), device=query.device)
            tail = torch.arange(prompt_len, lengths[batch_row], device=query.device)
            slots = torch.cat([pair // kv_heads, tail])
            lanes = torch.cat([pair % kv_heads, torch.full_like(tail, head)])
            blocks, within = pages[slots // block_size], slots % block_size
            keys = key_cache[blocks, lanes, within].float()
            values = value_cache[blocks, lanes, within].float()
            q = query[token, head * group : (head + 1) * group].float()
            weights = (q @ keys.T * scale).softmax(-1)
            out[token, head * group : (head + 1) * group] = (weights @ values).to(out.dtype)
