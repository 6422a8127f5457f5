"""Triton kernels of the split-KV (flash-decoding) attention over the flat head-wise cache.

Imported only by `adakv.kernels.triton_decode` when Triton is used (this module imports triton at the top).

Notation: a *sequence* s = batch * kv_heads + kv_head owns rows [offsets[s], offsets[s] + length)
of the flat K and V buffers (rows, head_dim), length = lengths[s] + extra_length. Its GQA group of
`GROUP` query heads and `query_length` new tokens form `GROUP * query_length` query rows,
row m = token * GROUP + group_head, so that a block of rows covers consecutive tokens (the causal
limit grows with the row index). Query token j sees key rows < length - query_length + j + 1.

`partial_attention` (grid: sequences x splits x query-row blocks) attends one chunk of one sequence's
keys with an online softmax in fp32 and writes the chunk's normalised output and log2-sum-exp.
`combine_splits` (grid: sequences x query-row blocks) merges the chunks and writes
(batch, query_length, heads, head_dim) in the query's dtype. With COMBINE_IN_LAST, `partial_attention`
merges them itself: each program counts its chunk as done on a per-(sequence, row block) counter, and the
program that finishes last merges and sets the counter back to 0 for the next call (one kernel per layer
instead of two; a decode step in a CUDA graph then has no second launch and gap per layer).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def partial_attention(
    Q, K, V, offsets, lengths, partial_out, partial_lse, Out, counters,
    stride_qb, stride_qh, stride_qt, stride_kv, stride_ob, stride_ot, stride_oh,
    qk_scale_log2, extra_length, num_kv_heads, query_length, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, COMBINE_IN_LAST: tl.constexpr,
):  # fmt: skip
    sequence = tl.program_id(0)
    split = tl.program_id(1)
    row_block = tl.program_id(2)
    batch = (sequence // num_kv_heads).to(tl.int64)
    kv_head = sequence % num_kv_heads
    start = tl.load(offsets + sequence).to(tl.int64)
    length = tl.load(lengths + sequence).to(tl.int32) + extra_length

    query_rows = GROUP * query_length
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < query_rows
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    q = tl.load(
        Q + batch * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qt + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    visible_end = length - query_length + token + 1  # (BLOCK_M,) keys < this are visible
    last_token = (tl.minimum(row_block * BLOCK_M + BLOCK_M, query_rows) - 1) // GROUP
    block_visible_end = length - query_length + last_token + 1

    # this split's keys: an equal share of *this* sequence's rows (heads differ in length)
    chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    key_start = split * chunk
    key_end = tl.minimum(key_start + chunk, block_visible_end)

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for block_start in range(key_start, key_end, BLOCK_N):
        cols = block_start + tl.arange(0, BLOCK_N)
        col_valid = cols < key_end
        kv_offsets = (start + cols)[:, None] * stride_kv + dims[None, :]
        kv_mask = col_valid[:, None] & dim_valid[None, :]
        k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        visible = col_valid[None, :] & (cols[None, :] < visible_end[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with nothing visible yet
        p = tl.exp2(scores - safe_max[:, None])
        rescale = tl.exp2(running_max - safe_max)
        v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
        running_sum = running_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        running_max = new_max

    has_keys = running_sum > 0
    lse = tl.where(has_keys, running_max + tl.log2(tl.where(has_keys, running_sum, 1.0)), float("-inf"))
    out = acc / tl.where(has_keys, running_sum, 1.0)[:, None]
    slot = (sequence * num_splits + split).to(tl.int64) * query_rows + rows  # (BLOCK_M,)
    tl.store(partial_lse + slot, lse, mask=row_valid)
    tl.store(
        partial_out + slot[:, None] * HEAD_DIM + dims[None, :], out, mask=row_valid[:, None] & dim_valid[None, :]
    )
    if COMBINE_IN_LAST:
        # Every thread's stores above happen before the barrier, and the barrier before the counter's
        # release; the last program's acquire then sees every chunk's stores (other programs' results
        # are read from L2, see _merge_splits).
        tl.debug_barrier()
        counter = counters + sequence * tl.num_programs(2) + row_block
        finished_before = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        if finished_before == num_splits - 1:
            _merge_splits(
                partial_out, partial_lse, Out, stride_ob, stride_ot, stride_oh, sequence, row_block,
                num_kv_heads, query_length, num_splits, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D,
            )  # fmt: skip
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def combine_splits(
    partial_out, partial_lse, Out,
    stride_ob, stride_ot, stride_oh,
    num_kv_heads, query_length, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    _merge_splits(
        partial_out, partial_lse, Out, stride_ob, stride_ot, stride_oh, tl.program_id(0), tl.program_id(1),
        num_kv_heads, query_length, num_splits, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D,
    )  # fmt: skip


@triton.jit
def _merge_splits(
    partial_out, partial_lse, Out, stride_ob, stride_ot, stride_oh, sequence, row_block,
    num_kv_heads, query_length, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Merge the chunks of one (sequence, query-row block) and write them to Out. The chunks are read
    through L2 (.cg): when the last program of partial_attention merges, other multiprocessors wrote them."""
    batch = (sequence // num_kv_heads).to(tl.int64)
    kv_head = sequence % num_kv_heads
    query_rows = GROUP * query_length
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < query_rows
    dims = tl.arange(0, BLOCK_D)
    mask = row_valid[:, None] & (dims < HEAD_DIM)[None, :]
    first_slot = sequence.to(tl.int64) * num_splits * query_rows

    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for split in range(num_splits):
        lse = tl.load(
            partial_lse + first_slot + split * query_rows + rows, mask=row_valid, other=float("-inf"), cache_modifier=".cg"
        )  # fmt: skip
        best = tl.maximum(best, lse)
    safe_best = tl.where(best == float("-inf"), 0.0, best)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(num_splits):
        slot = first_slot + split * query_rows + rows
        lse = tl.load(partial_lse + slot, mask=row_valid, other=float("-inf"), cache_modifier=".cg")
        out = tl.load(partial_out + slot[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        weight = tl.exp2(lse - safe_best)
        total += weight
        acc += weight[:, None] * out
    acc = acc / tl.where(total > 0, total, 1.0)[:, None]
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    pointers = Out + batch * stride_ob + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(pointers, acc.to(Out.dtype.element_ty), mask=mask)
