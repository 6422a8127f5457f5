"""Triton kernels of the split-KV decode attention over packed pages (the vLLM runtime's layout).

Imported only by `adakv.kernels.paged_decode` when Triton is used (this module imports triton at the top).

Notation: a *row* is one compressed request's decode token. Its KV head h reads a virtual sequence of
length n_h + tail: first its n_h packed pairs [offsets[h], offsets[h + 1]) (pair i lives in token slot
i // kv_heads, lane i % kv_heads), then its tail tokens [prompt_len, seq_len) (slot = position,
lane = h). A slot s is row s % block_size of page block_table[s // block_size]. Caches are
(num_blocks, kv_heads, block_size, head_dim) views with any strides and a unit last stride.

Work is balanced over a row's heads, which Ada-KV leaves of very different lengths: a row's keys of all
its heads (`total`) are cut into chunks of one size, cdiv(total, programs_per_row - kv_heads) rounded up
to BLOCK_N (at least `min_chunk`), so a head gets as many programs as it has chunks and at most
programs_per_row programs have work (each head's last chunk may be partial). Program p of a row works on
the head whose programs' range [first_program[h], first_program[h] + splits[h]) holds p; programs past
them return at once. `_row_work` computes this on the device from the offset table and seq_lens, so a
CUDA graph replays with any step's lengths.

`partial_attention` (grid: rows x programs_per_row) attends one chunk of one head for the head's GQA
group with an online softmax in fp32 and writes the chunk's normalised output and log2-sum-exp.
`combine_splits` (grid: rows x kv_heads) merges a head's chunks, SPLIT_TILE at a time for each query head of
its group, and writes the output in the query's dtype.

rows_info: (rows, 4) int32: query token index, batch row (its block-table row and its entry of
seq_lens), prompt_len (-1: an empty row, e.g. a CUDA graph's padding; 0: a dense row, all tail),
offset-table row. seq_lens: (batch rows,) int32 on the device, each row's tokens in the cache including
the one decoded.
"""

from __future__ import annotations

import triton
import triton.language as tl

SPLIT_TILE = tl.constexpr(16)  # chunks a combine step reads at once (16 x head_dim float32 per query head)


@triton.jit
def _row_work(rows_info, seq_lens, row, offset_table, num_kv_heads, programs_per_row, min_chunk,
              HEADS: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The row's query token, batch row and prompt_len, and per KV head (HEADS lanes, a power of two >=
    num_kv_heads): its first packed pair, packed pairs, sequence length, chunks and first program; and the
    chunk size."""
    info = rows_info + row * 4
    token = tl.load(info).to(tl.int64)
    batch_row = tl.load(info + 1).to(tl.int64)
    prompt_len = tl.load(info + 2)
    offsets = offset_table + tl.load(info + 3).to(tl.int64) * (num_kv_heads + 1)
    heads = tl.arange(0, HEADS)
    is_head = heads < num_kv_heads
    first_pair = tl.load(offsets + heads, mask=is_head, other=0)
    packed = tl.load(offsets + heads + 1, mask=is_head, other=0) - first_pair
    tail = tl.load(seq_lens + batch_row) - prompt_len
    lengths = tl.where(is_head & (prompt_len >= 0), packed + tail, 0)
    total = tl.sum(lengths, 0)
    chunk = tl.maximum(tl.cdiv(total, tl.maximum(programs_per_row - num_kv_heads, 1)), min_chunk)
    chunk = tl.cdiv(chunk, BLOCK_N) * BLOCK_N
    splits = tl.cdiv(lengths, chunk)
    first_program = tl.cumsum(splits, 0) - splits
    return token, batch_row, prompt_len, first_pair, packed, lengths, splits, first_program, chunk


@triton.jit
def _of_head(values, heads, head):
    """values[head] of a per-head vector."""
    return tl.sum(tl.where(heads == head, values, 0), 0)


@triton.jit
def _tile_rows(cols, key_end, packed, first_pair, prompt_len, kv_head, num_kv_heads, pages, block_size,
               stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs):  # fmt: skip
    """Where the keys `cols` (BLOCK_N positions of one head's virtual sequence) lie: the element offsets of
    their K and V rows, and which of them are before key_end. Reads the pages' numbers from the block table."""
    col_valid = cols < key_end
    in_context = cols < packed
    pair = first_pair + cols
    slot = tl.where(in_context, pair // num_kv_heads, prompt_len + cols - packed)
    lane = tl.where(in_context, pair % num_kv_heads, kv_head).to(tl.int64)
    slot = tl.where(col_valid, slot, 0)
    page = tl.load(pages + slot // block_size, mask=col_valid, other=0).to(tl.int64)
    within = (slot % block_size).to(tl.int64)
    k_rows = page * stride_kb + lane * stride_kh + within * stride_ks
    v_rows = page * stride_vb + lane * stride_vh + within * stride_vs
    return k_rows, v_rows, col_valid


@triton.jit
def partial_attention(
    Q, K, V, block_table, seq_lens, rows_info, offset_table, partial_out, partial_lse,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_bt,
    qk_scale_log2, num_kv_heads, block_size, programs_per_row, min_chunk,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    program = tl.program_id(1)
    token, table_row, prompt_len, first_pairs, packed_pairs, lengths, splits, first_programs, chunk = _row_work(
        rows_info, seq_lens, row, offset_table, num_kv_heads, programs_per_row, min_chunk, HEADS, BLOCK_N
    )
    heads = tl.arange(0, HEADS)
    kv_head = tl.sum(((first_programs + splits <= program) & (heads < num_kv_heads)).to(tl.int32), 0)  # heads before it
    if kv_head >= num_kv_heads:
        return
    first_pair = _of_head(first_pairs, heads, kv_head)
    packed = _of_head(packed_pairs, heads, kv_head)
    key_start = (program - _of_head(first_programs, heads, kv_head)) * chunk
    key_end = tl.minimum(key_start + chunk, _of_head(lengths, heads, kv_head))

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
    k_rows, v_rows, col_valid = _tile_rows(key_start + tl.arange(0, BLOCK_N), key_end, packed, first_pair,
                                           prompt_len, kv_head, num_kv_heads, pages, block_size, stride_kb,
                                           stride_kh, stride_ks, stride_vb, stride_vh, stride_vs)  # fmt: skip
    for block_start in range(key_start, key_end, BLOCK_N):
        # K and V of a tile are loaded together, and the next tile's page numbers while this one is computed:
        # each would otherwise wait for the memory in turn (a block-table read, then K, then V per tile)
        kv_mask = col_valid[:, None] & dim_valid[None, :]
        k = tl.load(K + k_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + v_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        valid = col_valid
        next_cols = block_start + BLOCK_N + tl.arange(0, BLOCK_N)
        k_rows, v_rows, col_valid = _tile_rows(next_cols, key_end, packed, first_pair, prompt_len, kv_head,
                                               num_kv_heads, pages, block_size, stride_kb, stride_kh, stride_ks,
                                               stride_vb, stride_vh, stride_vs)  # fmt: skip
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        p = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(running_max - new_max)
        running_sum = running_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        running_max = new_max

    lse = running_max + tl.log2(running_sum)
    out = acc / running_sum[:, None]
    slot_index = (row * programs_per_row + program).to(tl.int64) * BLOCK_M + group_rows
    tl.store(partial_lse + slot_index, lse, mask=row_valid)
    tl.store(
        partial_out + slot_index[:, None] * HEAD_DIM + dims[None, :], out, mask=row_valid[:, None] & dim_valid[None, :]
    )


@triton.jit
def combine_splits(
    seq_lens, rows_info, offset_table, partial_out, partial_lse, Out, stride_ot, stride_oh,
    num_kv_heads, programs_per_row, min_chunk,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid: rows x kv_heads. Each query head of the GQA group merges the head's chunks SPLIT_TILE at a time,
    not one by one: a long head of Ada-KV has a hundred chunks, and a loop of a hundred small loads waits for
    the memory a hundred times."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    token, _, _, _, _, _, splits, first_programs, _ = _row_work(
        rows_info, seq_lens, row, offset_table, num_kv_heads, programs_per_row, min_chunk, HEADS, BLOCK_N
    )
    heads = tl.arange(0, HEADS)
    used = _of_head(splits, heads, kv_head)
    first_slot = (row * programs_per_row + _of_head(first_programs, heads, kv_head)).to(tl.int64) * BLOCK_M
    tile = tl.arange(0, SPLIT_TILE)
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    for group_row in tl.static_range(GROUP):
        best = tl.full([SPLIT_TILE], float("-inf"), tl.float32)
        for start in range(0, used, SPLIT_TILE):
            slots = first_slot + (start + tile) * BLOCK_M + group_row
            best = tl.maximum(best, tl.load(partial_lse + slots, mask=start + tile < used, other=float("-inf")))
        top = tl.max(best, 0)
        total = tl.zeros([SPLIT_TILE], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for start in range(0, used, SPLIT_TILE):
            valid = start + tile < used
            slots = first_slot + (start + tile) * BLOCK_M + group_row
            weight = tl.exp2(tl.load(partial_lse + slots, mask=valid, other=float("-inf")) - top)
            out_mask = valid[:, None] & dim_valid[None, :]
            out = tl.load(partial_out + slots[:, None] * HEAD_DIM + dims[None, :], mask=out_mask, other=0.0)
            total += weight
            acc += tl.sum(weight[:, None] * out, 0)
        merged = tl.sum(total, 0)
        acc = acc / tl.where(merged > 0, merged, 1.0)
        pointers = Out + token * stride_ot + (kv_head * GROUP + group_row) * stride_oh + dims
        tl.store(pointers, acc.to(Out.dtype.element_ty), mask=dim_valid)
