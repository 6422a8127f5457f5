"""Triton kernels of the split-KV (flash-decoding) attention over the flat head-wise cache.

Imported only by `adakv.kernels.triton_decode` when Triton is used (this module imports triton at the top).

Notation: a *sequence* s = batch * kv_heads + kv_head owns rows [offsets[s], offsets[s] + length)
of the flat K and V buffers (rows, head_dim), length = lengths[s] + extra_length. Its GQA group of
`GROUP` query heads and `query_length` new tokens form `GROUP * query_length` query rows,
row m = token * GROUP + group_head, so that a block of rows covers consecutive tokens (the causal
limit grows with the row index). Query token j sees key rows < length - query_length + j + 1.

`partial_attention` (grid: sequences x splits x query-row blocks) attends one chunk of one sequence's
keys with an online softmax in fp32 and writes the chunk's normalised output and log2-sum-exp.
With SCALED, K and V hold float8_e4m3fn codes and K_scales/V_scales (rows,) float32 one scale per row
(adakv.kernels.fp8_reference): codes are converted to the query's dtype (exact), and since a row's scale is
one number, it multiplies that key's logit and that value's softmax weight instead of every element.
`combine_splits` (grid: sequences x query-row blocks) merges the chunks and writes
(batch, query_length, heads, head_dim) in the query's dtype. With COMBINE_IN_LAST, `partial_attention`
merges them itself: each program counts its chunk as done on a per-(sequence, row block) counter, and the
program that finishes last merges and sets the counter back to 0 for the next call (one kernel per layer
instead of two; a decode step in a CUDA graph then has no second launch and gap per layer).

`append_fp8_rows` (grid: sequences) is the append of a layer that stores fp8 rows: it quantizes each new
key and value row, writes codes and scales behind the sequence's used rows and advances its length, one
launch per layer and step (adakv.kernels.fp8_append).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def partial_attention(
    Q, K, V, K_scales, V_scales, offsets, lengths, partial_out, partial_lse, Out, counters,
    stride_qb, stride_qh, stride_qt, stride_kv, stride_ob, stride_ot, stride_oh,
    qk_scale_log2, extra_length, num_kv_heads, query_length, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, COMBINE_IN_LAST: tl.constexpr, SCALED: tl.constexpr,
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
        if SCALED:
            k = k.to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        if SCALED:
            scores = scores * tl.load(K_scales + start + cols, mask=col_valid, other=0.0)[None, :]
        visible = col_valid[None, :] & (cols[None, :] < visible_end[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with nothing visible yet
        p = tl.exp2(scores - safe_max[:, None])
        rescale = tl.exp2(running_max - safe_max)
        v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
        weights = p
        if SCALED:
            v = v.to(q.dtype)
            weights = p * tl.load(V_scales + start + cols, mask=col_valid, other=0.0)[None, :]
        running_sum = running_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)
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



@triton.jit
def append_fp8_rows(
    NewK, NewV, K, V, K_scales, V_scales, offsets, lengths, first_token,
    new_tokens, stride_ns, stride_nt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, FP8_MAX: tl.constexpr, HAS_FIRST: tl.constexpr,
):  # fmt: skip
    """Grid: sequences. Quantize sequence s's new keys/values (new_tokens, HEAD_DIM) from token first_token[s]
    on into the rows behind its used ones, then advance lengths[s] (only this program reads it)."""
    sequence = tl.program_id(0)
    first = tl.load(first_token + sequence).to(tl.int32) if HAS_FIRST else 0
    length = tl.load(lengths + sequence)
    start = tl.load(offsets + sequence) + length - first  # the row of token 0 (int64)
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    for token in range(first, new_tokens):
        source = sequence.to(tl.int64) * stride_ns + token * stride_nt
        _quantize_row(NewK + source, K, K_scales, start + token, dims, dim_valid, HEAD_DIM, FP8_MAX)
        _quantize_row(NewV + source, V, V_scales, start + token, dims, dim_valid, HEAD_DIM, FP8_MAX)
    tl.store(lengths + sequence, length + new_tokens - first)


@triton.jit
def _quantize_row(Row, Codes, Scales, row, dims, dim_valid, HEAD_DIM: tl.constexpr, FP8_MAX: tl.constexpr):
    """One row (HEAD_DIM values at Row) as e4m3 codes and one float32 scale, amax / FP8_MAX, at `row` of
    Codes/Scales (the format of adakv.kernels.fp8_reference)."""
    x = tl.load(Row + dims, mask=dim_valid, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(x), 0), FP8_MAX)  # IEEE division, as torch divides
    scale = tl.where(scale > 0, scale, 1.0)
    magnitude = _round_to_e4m3(tl.minimum(tl.abs(tl.math.div_rn(x, scale)), FP8_MAX))
    # the sign goes in as a bit, read off x: the quotient of a float32 subnormal entry (|x| < 2^-126) may be
    # flushed to +0, where torch's code is -0 for a negative entry
    sign = ((x.to(tl.int32, bitcast=True) >> 24) & 0x80).to(tl.uint8)
    unsigned = magnitude.to(Codes.dtype.element_ty).to(tl.uint8, bitcast=True)
    codes = (unsigned | sign).to(Codes.dtype.element_ty, bitcast=True)
    tl.store(Codes + row * HEAD_DIM + dims, codes, mask=dim_valid)
    tl.store(Scales + row, scale)


@triton.jit
def _round_to_e4m3(magnitude):
    """magnitude (float32, 0 <= magnitude <= 448) rounded to the nearest e4m3 value, ties to even, still in float32,
    so that the conversion after it is exact: the same codes as torch's conversion, also under Triton's CPU
    interpreter (whose own rounding mishandles a mantissa that rounds up into the next power of two)."""
    bits = magnitude.to(tl.int32, bitcast=True)
    # normal e4m3 values (>= 2^-6) keep 3 of float32's 23 mantissa bits: round the other 20 away
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    # below 2^-6 e4m3 steps by 2^-9: adding 1.5 * 2^14, whose float32 step is 2^-9, rounds the magnitude there
    subnormal = (magnitude + 24576.0) - 24576.0
    return tl.where(magnitude < 0.015625, subnormal, normal)
