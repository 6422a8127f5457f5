"""Decode attention over packed pages: each compressed request's kept pairs packed into its token
slots, then its tail tokens (the vLLM runtime's layout, adakv/runtimes/vllm/layout.py).

`packed_decode_attention` launches the Triton kernels of adakv.kernels.triton_pages (CUDA, or Triton's
interpreter on CPU with TRITON_INTERPRET=1); `packed_decode_reference` is the same computation in torch.

Shapes: query and out (tokens, num_heads, head_dim); key_cache, value_cache (num_blocks, kv_heads,
block_size, head_dim) views (unit last stride); block_table (batch_rows, max_blocks) int32; seq_lens
(batch_rows,) int32: tokens in each batch row's cache, the decoded one included; rows_info (rows, 4) int32
= (query token index, batch row, prompt_len, offset-table row): prompt_len 0 is a dense row (every token a
tail token, with an offset row of zeros), -1 an empty one (a CUDA graph's padding: its output is zeros).
offset_table (table rows, kv_heads + 1) int32: head h's packed pairs are [offsets[h], offsets[h + 1]).

The kernel cuts each row's keys, over all its heads, into chunks of one size on the device
(adakv/kernels/triton_pages.py), so a head that keeps four times the average gets four times the
programs: Ada-KV's uneven heads do not leave most of the GPU waiting on the longest one. Everything a
launch reads is a device tensor and its grid depends on the number of rows only, so a CUDA graph captured
for a batch size replays with any step's lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .triton_decode import LOG2_E, MIN_KEYS_PER_SPLIT, PROGRAMS_PER_SM, block_sizes, next_power_of_2


ROW_FIELDS = 4  # rows_info's columns
EMPTY_ROW = -1  # rows_info's prompt_len of a row that attends nothing


@dataclass(frozen=True)
class DecodePlan:
    """programs_per_row: programs of each row (its chunks of keys over all its heads, one each; the
    rest return at once); min_chunk: the fewest keys a chunk holds (below it a program's fixed cost
    outweighs the parallelism it adds); num_warps, num_stages: the attention launch's (Triton pipelines the
    tile loop's loads over num_stages), None: `block_sizes`' choice for the tiles (4 warps; 3 stages, 2 for
    rows wider than 256 bytes)."""

    programs_per_row: int
    min_chunk: int = MIN_KEYS_PER_SPLIT
    num_warps: int | None = None
    num_stages: int | None = None


def decode_plan(
    rows: int,
    kv_heads: int,
    num_sms: int,
    programs_per_sm: int = PROGRAMS_PER_SM,
    min_chunk: int = MIN_KEYS_PER_SPLIT,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> DecodePlan:
    """About `programs_per_sm` programs with work per multiprocessor over the batch, and at least twice
    kv_heads per row (a row's chunks number at most programs_per_row - kv_heads plus one partial chunk per
    head): a function of the batch's shape only (a CUDA graph captures it). The defaults are the HF flat
    kernel's (benchmarks/bench_paged_decode.py --programs-per-sm / --min-chunks / --num-warps / --num-stages
    sweeps others)."""
    programs_per_row = max(2 * kv_heads, -(-num_sms * programs_per_sm // max(rows, 1)))
    return DecodePlan(programs_per_row, min_chunk, num_warps, num_stages)


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
    bad_launch = plan.num_warps not in (None, 1, 2, 4, 8, 16) or plan.num_stages not in (None, *range(1, 9))
    if plan.programs_per_row <= kv_heads or plan.min_chunk < 1 or bad_launch:
        raise ValueError(
            f"{plan}: programs_per_row must exceed the {kv_heads} KV heads (each head may add a partial chunk), "
            "min_chunk must be positive, num_warps None or a power of two up to 16, num_stages None or 1 to 8"
        )
    group = num_heads // kv_heads
    tiles = dict(block_sizes(group, head_dim, query.dtype))  # one program holds a head's whole GQA group
    warps, stages = tiles.pop("num_warps"), tiles.pop("num_stages")
    if group > tiles["BLOCK_M"]:
        raise ValueError(f"{group} query heads per KV head: the packed-page decode kernel takes at most {tiles['BLOCK_M']}")
    kernels = _kernels()
    partial_out = torch.empty(
        rows * plan.programs_per_row * tiles["BLOCK_M"], head_dim, dtype=torch.float32, device=query.device
    )
    partial_lse = torch.empty(partial_out.shape[0], dtype=torch.float32, device=query.device)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    work = dict(HEADS=next_power_of_2(kv_heads), GROUP=group, HEAD_DIM=head_dim)
    kernels.partial_attention[(rows, plan.programs_per_row)](
        query, key_cache, value_cache, block_table, seq_lens, rows_info, offset_table, partial_out, partial_lse,
        query.stride(0), query.stride(1), *key_cache.stride()[:3], *value_cache.stride()[:3], block_table.stride(0),
        scale * LOG2_E, kv_heads, block_size, plan.programs_per_row, plan.min_chunk,
        DOT_PRECISION=precision, **work, **tiles,
        num_warps=plan.num_warps or warps, num_stages=plan.num_stages or stages,
    )  # fmt: skip
    kernels.combine_splits[(rows, kv_heads)](
        seq_lens, rows_info, offset_table, partial_out, partial_lse, out, out.stride(0), out.stride(1),
        kv_heads, plan.programs_per_row, plan.min_chunk,
        BLOCK_N=tiles["BLOCK_N"], BLOCK_M=tiles["BLOCK_M"], BLOCK_D=tiles["BLOCK_D"], num_warps=4, **work,
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
    for token, batch_row, prompt_len, offset_row in rows_info.tolist():
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
