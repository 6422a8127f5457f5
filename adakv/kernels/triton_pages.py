"""Triton kernels of the split-KV decode attention over packed pages (the vLLM runtime's layout).

Imported only by `adakv.kernels.paged_decode` when Triton is used (this module imports triton at the top).

Notation: a *row* is one compressed request's decode token. Its KV head h reads a virtual sequence of
length n_h + tail: first its n_h packed pairs [offsets[h], offsets[h + 1]) (pair i lives in token slot
i // kv_heads, lane i % kv_heads), then its tail tokens [prompt_len, seq_len) (slot = position,
lane = h). A slot s is row s % block_size of page block_table[s // block_size]. Caches are
(num_blocks, kv_heads, block_size, head_dim) views with any strides and a unit last stride.

`partial_attention` (grid: rows x kv_heads x splits) attends one chunk of that sequence (the row's
`chunk` keys; the last split to the sequence's end) for the head's GQA group with an online softmax in
fp32 and writes the chunk's normalised output and log2-sum-exp; programs past the sequence's end return
at once. `combine_splits` (grid: rows x kv_heads) merges the chunks the sequence has and writes the
output in the query's dtype.

rows_info: (rows, 5) int32: query token index, batch row (its block-table row and its entry of
seq_lens), prompt_len (-1: an empty row, e.g. a CUDA graph's padding; 0: a dense row, all tail),
offset-table row, chunk (keys per split, a multiple of BLOCK_N). seq_lens: (batch rows,) int32 on the
device, each row's tokens in the cache including the one decoded; read there, so a captured CUDA graph
replays with the step's lengths.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_info(rows_info, seq_lens, row, kv_head, offset_table, num_kv_heads):
    info = rows_info + row * 5
    token = tl.load(info).to(tl.int64)
    batch_row = tl.load(info + 1).to(tl.int64)
    prompt_len = tl.load(info + 2)
    offsets = offset_table + tl.load(info + 3).to(tl.int64) * (num_kv_heads + 1)
    chunk = tl.load(info + 4)
    first_pair = tl.load(offsets + kv_head)
    packed = tl.load(offsets + kv_head + 1) - first_pair
    length = tl.where(prompt_len < 0, 0, packed + tl.load(seq_lens + batch_row) - prompt_len)
    return token, batch_row, prompt_len, first_pair, packed, length, chunk


@triton.jit
def partial_attention(
    Q, K, V, block_table, seq_lens, rows_info, offset_table, partial_out, partial_lse,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_bt,
    qk_scale_log2, num_kv_heads, block_size, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    token, table_row, prompt_len, first_pair, packed, length, chunk = _row_info(
        rows_info, seq_lens, row, kv_head, offset_table, num_kv_heads
    )
    key_start = split * chunk
    if key_start >= length:
        return
    # the last split takes whatever is left: a chunk sized on the host from a length bound never drops keys
    key_end = tl.where(split == num_splits - 1, length, tl.minimum(key_start + chunk, length))

    group_rows = tl.arange(0, BLOCK_M)
    row_valid = group_rows < GROUP
    head = kv_head * GROUP + group_rows
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    q = tl.load(
        Q + token * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    pages = block_table + table_row * stride_bt

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for block_start in range(key_start, key_end, BLOCK_N):
        cols = block_start + tl.arange(0, BLOCK_N)
        col_valid = cols < key_end
        in_context = cols < packed
        pair = first_pair + cols
        slot = tl.where(in_context, pair // num_kv_heads, prompt_len + cols - packed)
        lane = tl.where(in_context, pair % num_kv_heads, kv_head).to(tl.int64)
        slot = tl.where(col_valid, slot, 0)
        page = tl.load(pages + slot // block_size, mask=col_valid, other=0).to(tl.int64)
        within = (slot % block_size).to(tl.int64)
        kv_mask = col_valid[:, None] & dim_valid[None, :]
        k_rows = page * stride_kb + lane * stride_kh + within * stride_ks
        k = tl.load(K + k_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        scores = tl.where(col_valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        p = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(running_max - new_max)
        v_rows = page * stride_vb + lane * stride_vh + within * stride_vs
        v = tl.load(V + v_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        running_sum = running_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        running_max = new_max

    lse = running_max + tl.log2(running_sum)
    out = acc / running_sum[:, None]
    slot_index = ((row * num_kv_heads + kv_head) * num_splits + split).to(tl.int64) * BLOCK_M + group_rows
    tl.store(partial_lse + slot_index, lse, mask=row_valid)
    tl.store(
        partial_out + slot_index[:, None] * HEAD_DIM + dims[None, :], out, mask=row_valid[:, None] & dim_valid[None, :]
    )


@triton.jit
def combine_splits(
    seq_lens, rows_info, offset_table, partial_out, partial_lse, Out, stride_ot, stride_oh,
    num_kv_heads, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    token, _, _, _, _, length, chunk = _row_info(rows_info, seq_lens, row, kv_head, offset_table, num_kv_heads)
    used = tl.minimum(tl.cdiv(length, chunk), num_splits)
    group_rows = tl.arange(0, BLOCK_M)
    row_valid = group_rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    mask = row_valid[:, None] & (dims < HEAD_DIM)[None, :]
    first_slot = ((row * num_kv_heads + kv_head) * num_splits).to(tl.int64) * BLOCK_M

    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for split in range(used):
        lse = tl.load(partial_lse + first_slot + split * BLOCK_M + group_rows, mask=row_valid, other=float("-inf"))
        best = tl.maximum(best, lse)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(used):
        slot = first_slot + split * BLOCK_M + group_rows
        lse = tl.load(partial_lse + slot, mask=row_valid, other=float("-inf"))
        out = tl.load(partial_out + slot[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
        weight = tl.exp2(lse - best)
        total += weight
        acc += weight[:, None] * out
    acc = acc / tl.where(total > 0, total, 1.0)[:, None]
    head = kv_head * GROUP + group_rows
    pointers = Out + token * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(pointers, acc.to(Out.dtype.element_ty), mask=mask)
