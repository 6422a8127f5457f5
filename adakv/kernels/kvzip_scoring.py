"""KVzip's scoring as two Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1, for tests).

KVzip scores each context key by the largest attention probability it receives from any reconstruction
query of its KV head. In PyTorch (kvzip_reference.py, `torch_max_attention`) that materialises each block's
probabilities, (queries x keys) floats per query head; here it is two passes that hold nothing of that size,
as flash attention does:

1. `row_logsumexp_kernel`: per query row, the log-sum-exp (base 2) of its scaled scores over every key it
   sees (the context, then the stream up to itself), by an online maximum and sum over key blocks;
2. `max_probability_kernel`: per block of context keys, max over the group's query heads and the counted
   queries of exp2(score - logsumexp), merged into the running maximum.

Every reconstruction query sees every context key, so the second pass has no causal mask. The
reconstruction itself (`kvzip_reference.flash_attend_and_score`) runs the second kernel alone
(`triton_max_probability`) on the log-sum-exps its flash attention returns; both kernels run
(`triton_max_attention`) where no attention output is needed (the last scored layer). Scores are fp32
(tl.dot accumulates in fp32; fp32 inputs use IEEE fp32 products), so the results equal the PyTorch path up
to summation order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from adakv.kernels.device import on_device_of

LOG2_E = math.log2(math.e)


@triton.jit
def row_logsumexp_kernel(
    Q, K, LSE, heads, groups, rows, first_row, seen_before, scale_log2,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """LSE[batch * heads + head, row] = log2 sum over visible keys of exp2(q . k * scale_log2); row r of the
    chunk sees keys [0, seen_before + r]."""
    pid_bh = tl.program_id(0)
    batch, head = pid_bh // heads, pid_bh % heads
    kv_head = head // groups
    offs_m = first_row + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q = tl.load(
        Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=(offs_m < rows)[:, None] & d_valid[None, :], other=0.0,
    )  # fmt: skip
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    last_row = tl.minimum(first_row + (tl.program_id(1) + 1) * BLOCK_M, rows) - 1
    for start in range(0, seen_before + last_row + 1, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = tl.load(
            K + batch * stride_kb + kv_head * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None],
            mask=(offs_n <= seen_before + last_row)[None, :] & d_valid[:, None], other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        visible = offs_n[None, :] <= seen_before + offs_m[:, None]
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        running_sum = running_sum * tl.exp2(running_max - new_max) + tl.sum(tl.exp2(scores - new_max[:, None]), axis=1)
        running_max = new_max
    tl.store(LSE + pid_bh * rows + offs_m, running_max + tl.log2(running_sum), mask=offs_m < rows)


@triton.jit
def max_probability_kernel(
    Q, K, LSE, RUNNING, heads, kv_heads, groups, rows, first_row, context_length, scale_log2,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_rb, stride_rh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """RUNNING[batch, kv_head, key] = max(itself, largest probability the key gets from the counted rows of
    the kv head's query heads), for BLOCK_N context keys per program."""
    pid_bk = tl.program_id(0)
    batch, kv_head = pid_bk // kv_heads, pid_bk % kv_heads
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < context_length
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    k = tl.load(
        K + batch * stride_kb + kv_head * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None],
        mask=n_valid[None, :] & d_valid[:, None], other=0.0,
    )  # (BLOCK_D, BLOCK_N)
    best = tl.zeros([BLOCK_N], dtype=tl.float32)
    for group in range(groups):
        head = kv_head * groups + group
        for start in range(first_row, rows, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_valid = offs_m < rows
            q = tl.load(
                Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0,
            )  # fmt: skip
            lse = tl.load(LSE + (batch * heads + head) * rows + offs_m, mask=m_valid, other=float("inf"))
            scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
            best = tl.maximum(best, tl.max(tl.exp2(scores - lse[:, None]), axis=0))
    pointers = RUNNING + batch * stride_rb + kv_head * stride_rh + offs_n
    tl.store(pointers, tl.maximum(tl.load(pointers, mask=n_valid, other=0.0), best), mask=n_valid)


def triton_max_attention(
    running_max: torch.Tensor, chunk_queries: torch.Tensor, keys: torch.Tensor, scaling: float,
    context_length: int, chunk_start: int, first_counted: int,
) -> None:
    """`torch_max_attention`'s contract (kvzip_reference.py), in two kernels: running_max (batch, kv_heads,
    context_length) fp32 with a unit last stride; chunk_queries (batch, heads, chunk, head_dim) and keys
    (batch, kv_heads, context_length + chunk_start + chunk, head_dim), unit last strides, one dtype."""
    batch, heads, chunk, head_dim = chunk_queries.shape
    first_row = max(0, first_counted - chunk_start)
    if first_row >= chunk:
        return
    block_d, block, precision = tiles(chunk_queries)
    strides = (*chunk_queries.stride()[:3], *keys.stride()[:3])
    lse = torch.empty(batch * heads, chunk, device=keys.device, dtype=torch.float32)
    with on_device_of(keys):
        row_logsumexp_kernel[(batch * heads, triton.cdiv(chunk - first_row, block))](
            chunk_queries, keys, lse, heads, heads // keys.shape[1], chunk, first_row, context_length + chunk_start,
            scaling * LOG2_E, *strides, HEAD_DIM=head_dim, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d,
            DOT_PRECISION=precision,
        )  # fmt: skip
    launch_max_probability(running_max, chunk_queries, keys, lse, scaling, context_length, first_row)


def triton_max_probability(
    running_max: torch.Tensor, chunk_queries: torch.Tensor, keys: torch.Tensor, logsumexp: torch.Tensor,
    scaling: float, context_length: int, chunk_start: int, first_counted: int,
) -> None:
    """The second kernel alone, for a caller that has each row's normaliser already (the reconstruction's
    flash attention): logsumexp (batch, heads, chunk) float32, natural log of the sum over the keys the row
    sees of exp(scaling * q . k). Other arguments as `triton_max_attention`."""
    chunk = chunk_queries.shape[2]
    first_row = max(0, first_counted - chunk_start)
    if first_row >= chunk:
        return
    lse_log2 = (logsumexp.float() * LOG2_E).reshape(-1, chunk).contiguous()  # (batch * heads, chunk), base 2
    launch_max_probability(running_max, chunk_queries, keys, lse_log2, scaling, context_length, first_row)


def tiles(chunk_queries: torch.Tensor) -> tuple[int, int, str]:
    """(BLOCK_D, BLOCK_M = BLOCK_N, dot precision) of both kernels."""
    block_d = max(16, triton.next_power_of_2(chunk_queries.shape[-1]))
    return block_d, 64 if block_d <= 128 else 32, "ieee" if chunk_queries.dtype == torch.float32 else "tf32"


def launch_max_probability(
    running_max: torch.Tensor, chunk_queries: torch.Tensor, keys: torch.Tensor, lse_log2: torch.Tensor,
    scaling: float, context_length: int, first_row: int,
) -> None:
    """max_probability_kernel over every context key; lse_log2 (batch * heads, chunk) base-2 normalisers."""
    batch, heads, chunk, head_dim = chunk_queries.shape
    kv_heads = keys.shape[1]
    block_d, block, precision = tiles(chunk_queries)
    strides = (*chunk_queries.stride()[:3], *keys.stride()[:3])
    with on_device_of(keys):
        max_probability_kernel[(batch * kv_heads, triton.cdiv(context_length, block))](
            chunk_queries, keys, lse_log2, running_max, heads, kv_heads, heads // kv_heads, chunk, first_row,
            context_length, scaling * LOG2_E, *strides, running_max.stride(0), running_max.stride(1),
            HEAD_DIM=head_dim, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, DOT_PRECISION=precision,
        )  # fmt: skip
