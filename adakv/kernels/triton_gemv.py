"""A Triton matrix-vector product for decode steps: y = x @ weight.T (+ bias) for a few rows of x (CUDA only).

At batch 1 a decode step's linear layers read every weight once and do two flops per weight, so they are
bound by memory bandwidth; torch's matmuls (cuBLAS) reach about 1.16x the weight-read limit on an H200
(benchmarks/results/decode_floor_NVIDIA_H200.json, all layers in one CUDA graph). `gemv` streams the weight
in (BLOCK_N x BLOCK_K) tiles, one program per BLOCK_N output features over the whole input dimension, fp32
accumulation, one rounding to the output dtype (as cuBLAS; only the summation order differs). One row of x
is multiplied in registers; 2 to MAX_ROWS rows go through tl.dot (padded to 16).
The tiles come from `gemv_tiles` (adakv/runtimes/hf/fusion/gemv_linears.py), a plan fitted to an H200 sweep;
`gemv_linears` routes a block's decode-step linears here. `benchmarks/bench_gemv.py` compares it with
torch's product per layer shape and over a whole step.

Shapes: x (..., K) with at most MAX_ROWS rows in all, any row stride with a unit last stride; weight
(N, K) contiguous; bias (N,) or None; returns (..., N) in x's dtype. fp16/bf16/fp32 (fp32 with IEEE fp32
products). `silu_gated_gemv` does an MLP's joined gate/up product and its silu(gate) * up in one launch
(the activation as an epilogue: no kernel of its own, and gate and up are never written).
This module imports triton at the top: import it only where Triton runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adakv.kernels.device import on_device_of
from adakv.kernels.device import multiprocessor_count
from adakv.kernels.gemv_plan import MAX_ROWS, gemv_tiles


INTERPRETER_MULTIPROCESSORS = 132  # planned for under Triton's CPU interpreter: an H200's count


@triton.jit
def _weight_rows_times_x(
    X, W, B, row_ids, row_valid, features, feature_valid, k_features, stride_x,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, BLOCK_N) fp32: rows `row_ids` of X times weight rows `features` over the whole input
    dimension, plus those features of the bias. BLOCK_M == 1: element-wise products accumulated in a
    (BLOCK_N, BLOCK_K) fp32 tile and summed along K once at the end (a reduction across threads per tile
    would stall the loads); BLOCK_M >= 16 (a few rows padded): tl.dot per tile."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    products = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # one row: summed along K once, after the loop
    for start in range(0, k_features, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_valid = ks < k_features
        w = tl.load(
            W + features[:, None].to(tl.int64) * k_features + ks[None, :],
            mask=feature_valid[:, None] & k_valid[None, :], other=0.0,
        )  # (BLOCK_N, BLOCK_K)
        x = tl.load(
            X + row_ids[:, None].to(tl.int64) * stride_x + ks[None, :],
            mask=row_valid[:, None] & k_valid[None, :], other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        if BLOCK_M == 1:
            products += x.to(tl.float32) * w.to(tl.float32)
        else:
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    if BLOCK_M == 1:
        acc += tl.sum(products, axis=1)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + features, mask=feature_valid, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def gemv_kernel(
    X, W, B, Y, rows, n_features, k_features, stride_x, stride_y,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N output features of every row."""
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_valid = features < n_features
    row_ids = tl.arange(0, BLOCK_M)
    row_valid = row_ids < rows
    acc = _weight_rows_times_x(
        X, W, B, row_ids, row_valid, features, feature_valid, k_features, stride_x,
        HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
    )  # fmt: skip
    tl.store(
        Y + row_ids[:, None].to(tl.int64) * stride_y + features[None, :],
        acc.to(Y.dtype.element_ty),
        mask=row_valid[:, None] & feature_valid[None, :],
    )


@triton.jit
def silu_gated_gemv_kernel(
    X, W, B, Y, rows, n_out, k_features, stride_x, stride_y,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N features j of silu(gate) * up, gate_j from weight row j and up_j from row
    n_out + j. Rounded where the separate kernels round: gate and up to the dtype (as `gemv_kernel` writes
    them), silu(gate) to the dtype, then the product (as silu_mul_kernel in triton_elementwise.py)."""
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_valid = features < n_out
    row_ids = tl.arange(0, BLOCK_M)
    row_valid = row_ids < rows
    gate = _weight_rows_times_x(
        X, W, B, row_ids, row_valid, features, feature_valid, k_features, stride_x,
        HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
    )  # fmt: skip
    up = _weight_rows_times_x(
        X, W, B, row_ids, row_valid, n_out + features, feature_valid, k_features, stride_x,
        HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION,
    )  # fmt: skip
    dtype = Y.dtype.element_ty
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(
        Y + row_ids[:, None].to(tl.int64) * stride_y + features[None, :],
        (activated * up).to(dtype),
        mask=row_valid[:, None] & feature_valid[None, :],
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tiles: dict | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T + bias -> (..., N); at most MAX_ROWS rows. tiles: BLOCK_N, BLOCK_K,
    num_warps, num_stages overriding `gemv_tiles`' plan (for tuning sweeps)."""
    return _launch(gemv_kernel, x, weight, bias, weight.shape[0] if weight.dim() == 2 else 0, tiles)


def silu_gated_gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tiles: dict | None = None
) -> torch.Tensor:
    """silu(gate) * up of a joined gate/up product in one launch, without writing gate and up: weight
    (2 * n, K) holds gate's rows then up's, bias (2 * n,) or None; x (..., K) -> (..., n). Equals
    `silu_mul` (triton_elementwise.py) of the two halves of `gemv(x, weight, bias)`."""
    if weight.dim() != 2 or weight.shape[0] % 2:
        raise ValueError(f"weight must be a (2 * n, K) matrix of gate's rows then up's, got {tuple(weight.shape)}.")
    return _launch(silu_gated_gemv_kernel, x, weight, bias, weight.shape[0] // 2, tiles)


def _launch(kernel, x, weight, bias, n_out: int, tiles: dict | None) -> torch.Tensor:
    """Checks the inputs, then runs `kernel` with one program per BLOCK_N of the n_out output features."""
    k_features = x.shape[-1]
    rows = x.numel() // max(k_features, 1)
    if rows > MAX_ROWS or rows == 0:
        raise ValueError(f"gemv takes 1 to {MAX_ROWS} rows of x, got {rows} (shape {tuple(x.shape)}).")
    if weight.dim() != 2 or weight.shape[1] != k_features or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous (N, {k_features}) matrix, got {tuple(weight.shape)}.")
    if weight.dtype != x.dtype or (bias is not None and (bias.dtype != x.dtype or bias.shape != weight.shape[:1])):
        raise ValueError("x, weight and bias must share one dtype, and bias must be (N,).")
    x2d = x.reshape(rows, k_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = torch.empty(rows, n_out, device=x.device, dtype=x.dtype)
    multiprocessors = multiprocessor_count(x.device.index) if x.is_cuda else INTERPRETER_MULTIPROCESSORS
    settings = gemv_tiles(rows, n_out, multiprocessors, x.element_size()) | (tiles or {})
    block_m = 1 if rows == 1 else 16  # tl.dot needs 16 rows at least
    block_n = settings["BLOCK_N"] if block_m == 1 else max(16, settings["BLOCK_N"])
    with on_device_of(x):
        kernel[(triton.cdiv(n_out, block_n),)](
            x2d, weight, bias if bias is not None else weight, out, rows, n_out, k_features,
            x2d.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=settings["BLOCK_K"],
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=settings["num_warps"], num_stages=settings["num_stages"],
        )  # fmt: skip
    return out.reshape(*x.shape[:-1], n_out)
