"""The fused element-wise operations of `fused_elementwise`, written with torch operations.

Each function states, in torch, exactly the arithmetic the Triton kernel of the same name
(adakv/kernels/triton_elementwise.py) does in one launch: fp32 arithmetic, rounded to the output dtype at
the same points as transformers' modules round (the tests check that these equal transformers' arithmetic
bit for bit). The GPU tests compare the kernels with these (within one bf16 step); the CPU tests run the
fusion's module patching with these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float, scale_in_fp32: bool) -> torch.Tensor:
    """(..., n) -> (..., n). Llama style (scale_in_fp32=False): the normalised row is rounded to x's dtype,
    then multiplied by weight (output dtype: the promotion of both). Gemma style (True): multiplied by
    (weight_offset + weight) in fp32, then rounded to x's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if scale_in_fp32:
        return (normed * (weight_offset + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def add_rms_norm(
    residual: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float, scale_in_fp32: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + update, rms_norm of that sum): the sum rounded to the dtype first, as `residual + h`
    followed by the norm module rounds it."""
    total = residual + update
    return total, rms_norm(total, weight, eps, weight_offset, scale_in_fp32)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q and of k. q (batch, q_heads, tokens, head_dim), k (batch, k_heads,
    tokens, head_dim); cos, sin (batch or 1, tokens, head_dim), all one dtype. Each product and the sum are
    rounded to that dtype, as x * cos + rotate_half(x) * sin rounds them."""
    return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One tensor of `rotary`: x (batch, heads, tokens, head_dim)."""
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + turned * sin.unsqueeze(1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(..., n), (..., n) -> (..., n): silu(gate) rounded to gate's dtype, times up."""
    return F.silu(gate) * up
