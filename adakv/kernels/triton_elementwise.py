"""Triton kernels of the fused element-wise operations of `fused_elementwise` (CUDA only).

Imported only when the fusion runs on CUDA (this module imports triton at the top). Each kernel does in
one launch what transformers' module does in 2 to 8 (adakv/kernels/elementwise_reference.py states the
same arithmetic in torch):

- `rms_norm_kernel` (grid: rows): one row of (rows, n) per program, optionally adding a residual first
  (`add_rms_norm`: the sum and its norm in one launch);
- `rotary_kernel` (grid: batch * tokens, q heads + k heads): one head vector of q or k of one token per
  program, q and k in one launch;
- `silu_mul_kernel` (grid: rows, column blocks).

Inputs may be strided along rows (views of a joined projection, transposed heads); a last dimension that
is not contiguous is copied first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adakv.kernels.device import on_device_of

SILU_BLOCK = 1024


@triton.jit
def rms_norm_kernel(
    X, U, SUM, W, Y, stride_x, stride_u, stride_s, stride_y, n_cols, eps, weight_offset,
    HAS_UPDATE: tl.constexpr, SCALE_IN_FP32: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Y = rms_norm(X), or with HAS_UPDATE: SUM = X + U (rounded to X's dtype) and Y = rms_norm(SUM)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_UPDATE:
        update = tl.load(U + row * stride_u + cols, mask=valid, other=0.0).to(tl.float32)
        total = (x + update).to(X.dtype.element_ty)
        tl.store(SUM + row * stride_s + cols, total, mask=valid)
        x = total.to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    weight = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
    if SCALE_IN_FP32:
        y = normed * (weight_offset + weight)
    else:
        y = normed.to(X.dtype.element_ty).to(tl.float32) * weight
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=valid)


@triton.jit
def _rotate_head(
    X, OUT, COS, SIN, batch, head, token, stride_xb, stride_xh, stride_xt, stride_ob, stride_oh, stride_ot,
    stride_cb, stride_ct, HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One head vector of one token: OUT = X * cos + rotate_half(X) * sin."""
    dims = tl.arange(0, BLOCK)
    valid = dims < HALF
    x_row = X + batch * stride_xb + head * stride_xh + token * stride_xt
    angle_row = batch * stride_cb + token * stride_ct
    x1 = tl.load(x_row + dims, mask=valid, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + dims, mask=valid, other=0.0).to(tl.float32)
    cos1 = tl.load(COS + angle_row + dims, mask=valid, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + angle_row + HALF + dims, mask=valid, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + angle_row + dims, mask=valid, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + angle_row + HALF + dims, mask=valid, other=0.0).to(tl.float32)
    dtype = OUT.dtype.element_ty
    # round each product and the sum to the output dtype, as x * cos + rotate_half(x) * sin does
    first = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
    second = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    out_row = OUT + batch * stride_ob + head * stride_oh + token * stride_ot
    tl.store(out_row + dims, first.to(dtype), mask=valid)
    tl.store(out_row + HALF + dims, second.to(dtype), mask=valid)


@triton.jit
def rotary_kernel(
    Q, K, COS, SIN, Q_OUT, K_OUT,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_qob, stride_qoh, stride_qot, stride_kob, stride_koh, stride_kot,
    stride_cb, stride_ct, tokens, q_heads,
    HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Programs (batch * tokens, q_heads + k_heads): the first q_heads rotate q's heads, the rest k's."""
    batch_token = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    batch = (batch_token // tokens).to(tl.int64)
    token = (batch_token % tokens).to(tl.int64)
    if head < q_heads:
        _rotate_head(Q, Q_OUT, COS, SIN, batch, head, token, stride_qb, stride_qh, stride_qt,
                     stride_qob, stride_qoh, stride_qot, stride_cb, stride_ct, HALF, BLOCK)  # fmt: skip
    else:
        _rotate_head(K, K_OUT, COS, SIN, batch, head - q_heads, token, stride_kb, stride_kh, stride_kt,
                     stride_kob, stride_koh, stride_kot, stride_cb, stride_ct, HALF, BLOCK)  # fmt: skip


@triton.jit
def silu_mul_kernel(G, U, OUT, stride_g, stride_u, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    gate = tl.load(G + row * stride_g + cols, mask=valid, other=0.0).to(tl.float32)
    up = tl.load(U + row * stride_u + cols, mask=valid, other=0.0).to(tl.float32)
    dtype = OUT.dtype.element_ty
    activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (activated * up).to(dtype), mask=valid)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., n) as (rows, n) with a contiguous last dimension (a view where strides allow)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float, scale_in_fp32: bool) -> torch.Tensor:
    return _rms_norm(x, None, weight, eps, weight_offset, scale_in_fp32)[1]


def add_rms_norm(
    residual: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float, scale_in_fp32: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm(residual, update, weight, eps, weight_offset, scale_in_fp32)


def _rms_norm(x, update, weight, eps, weight_offset, scale_in_fp32) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(x + update or None, the norm of that sum or of x) in one launch."""
    out_dtype = x.dtype if scale_in_fp32 else torch.promote_types(weight.dtype, x.dtype)
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    update_rows = rows if update is None else _rows(update)  # (unread without an update)
    total = None if update is None else torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    sum_rows = out if total is None else total  # (unwritten without an update)
    with on_device_of(x):
        rms_norm_kernel[(rows.shape[0],)](
            rows, update_rows, sum_rows, weight, out,
            rows.stride(0), update_rows.stride(0), sum_rows.stride(0), out.stride(0),
            rows.shape[1], eps, weight_offset,
            HAS_UPDATE=update is not None, SCALE_IN_FP32=scale_in_fp32, BLOCK=triton.next_power_of_2(rows.shape[1]),
        )  # fmt: skip
    return None if total is None else total.view(x.shape), out.view(x.shape)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (batch, q_heads, tokens, head_dim) and k (batch, k_heads, tokens, head_dim) rotated in one launch."""
    batch, q_heads, tokens, head_dim = q.shape
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    cos, sin = cos.expand(batch, tokens, head_dim), sin.expand(batch, tokens, head_dim)
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # keep the inputs' layouts, as the unfused arithmetic does
    half = head_dim // 2
    with on_device_of(q):
        rotary_kernel[(batch * tokens, q_heads + k.shape[1])](
            q, k, cos, sin, q_out, k_out, *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
            cos.stride(0), cos.stride(1), tokens, q_heads, HALF=half, BLOCK=triton.next_power_of_2(half),
        )  # fmt: skip
    return q_out, k_out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate_rows, up_rows = _rows(gate), _rows(up)
    out = torch.empty(gate_rows.shape, dtype=gate.dtype, device=gate.device)
    grid = (gate_rows.shape[0], triton.cdiv(gate_rows.shape[1], SILU_BLOCK))
    with on_device_of(gate):
        silu_mul_kernel[grid](
            gate_rows, up_rows, out, gate_rows.stride(0), up_rows.stride(0), out.stride(0), gate_rows.shape[1],
            BLOCK=SILU_BLOCK,
        )  # fmt: skip
    return out.view(gate.shape)
