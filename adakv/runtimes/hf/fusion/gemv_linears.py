"""Decode-step linear layers as adakv's Triton GEMV, for the duration of a block.

At batch 1 a decode step's linear layers are matrix-vector products bound by reading the weights; on an
H200 torch's products (cuBLAS) read them at about 1.16x the copy-bandwidth limit
(benchmarks/results/decode_floor_NVIDIA_H200.json). `gemv_linears(model, groups)` routes every product
with 1 to MAX_ROWS input rows through `gemv` (adakv/kernels/triton_gemv.py, tiles from `gemv_tiles`) and
leaves larger inputs (prefills, long appends) to torch:

- every plain `nn.Linear` of the model, the lm_head included, gets an instance `forward`;
- the joined groups of `joined_projections` (passed as `groups`) compute their joined product with it;
- the joined gate/up groups of MLPs also offer silu(gate) * up in one launch (`silu_gated_gemv`), which
  `fused_elementwise`'s MLP forward takes: the activation then has no kernel of its own.

Linears whose forward another wrapper already replaced (an accelerate hook), subclasses of nn.Linear
(quantized layers) and linears whose weight is a tensor subclass (tensor-parallel DTensors) are left as they
are and listed. On exit every module and group computes with torch again. Forwards that record gradients for a
weight go to torch too: the GEMV has no backward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Generator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adakv.runtimes.hf.fusion.joined_projections import JoinedGroup
from adakv.kernels.gemv_plan import MAX_ROWS
from adakv.models import check_parameters_on_cuda, forward_is_replaced

# (x (..., K), weight (N, K), bias (N,) or None) -> (..., N)
Product = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class GemvLinears:
    """What `gemv_linears` routed: module and joined-group counts (gated: MLP gate/up groups that also offer
    silu(gate) * up in one launch), and the linears it left with their reason."""

    linears: int = 0
    groups: int = 0
    gated_groups: int = 0
    left_as_is: list[str] = field(default_factory=list)


def triton_products() -> tuple[Product, Product]:
    """(gemv, silu_gated_gemv) of adakv/kernels/triton_gemv.py."""
    try:
        from adakv.kernels.triton_gemv import gemv, silu_gated_gemv
    except ImportError as error:
        raise RuntimeError(f"gemv_linears needs Triton ({error}); use gemv_linears=False.") from error
    return gemv, silu_gated_gemv


def gemv_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """1 to MAX_ROWS rows, a contiguous weight, one dtype, no gradients to record (the GEMV has no backward)."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (
        1 <= rows <= MAX_ROWS
        and weight.is_contiguous()
        and x.dtype == weight.dtype
        and (bias is None or bias.dtype == weight.dtype)
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
    )


def routed_product(gemv: Product) -> Product:
    """`gemv` for inputs of 1 to MAX_ROWS rows that it can take, F.linear for everything else."""

    def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return gemv(x, weight, bias) if gemv_takes(x, weight, bias) else F.linear(x, weight, bias)

    return product


def routed_silu_gated(silu_gated: Product):
    """`silu_gated` for inputs the GEMV takes, None for the others (their MLP runs its separate kernels)."""

    def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        return silu_gated(x, weight, bias) if gemv_takes(x, weight, bias) else None

    return product


@contextmanager
def gemv_linears(
    model: nn.Module, groups: Sequence[JoinedGroup] = (), gemv: Product | None = None, silu_gated: Product | None = None
) -> Generator[GemvLinears, None, None]:
    """Within the block the model's linears (and `groups`' joined products) run products of 1 to MAX_ROWS
    input rows through `gemv`, and MLP gate/up groups offer `silu_gated` (silu(gate) * up of their joined
    product): by default adakv's Triton kernels, which need a CUDA model; tests pass torch products to run
    the routing on CPU (without `silu_gated`, no group offers it). Yields what was routed."""
    if gemv is None:
        check_parameters_on_cuda(model, "gemv_linears", "a Triton kernel")
        gemv, silu_gated = triton_products()
    product = routed_product(gemv)
    report = GemvLinears()
    linears = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if type(module) is not nn.Linear:
            report.left_as_is.append(f"{name}: a {type(module).__name__}, not a plain nn.Linear (e.g. quantized)")
        elif type(module.weight.data) is not torch.Tensor:
            report.left_as_is.append(f"{name}: its weight is a {type(module.weight.data).__name__} (e.g. a tensor-parallel shard)")
        elif forward_is_replaced(module):
            if not any(module in group.linears for group in groups):
                report.left_as_is.append(f"{name}: its forward is already replaced by another wrapper")
        else:
            linears.append(module)
    try:
        for linear in linears:
            linear.forward = lambda x, linear=linear: product(x, linear.weight, linear.bias)
            report.linears += 1
        for group in groups:
            group.product = product
            report.groups += 1
            if silu_gated is not None and group.parent == "mlp":
                group.silu_gated_product = routed_silu_gated(silu_gated)
                report.gated_groups += 1
        yield report
    finally:
        for linear in linears:
            linear.__dict__.pop("forward", None)
        for group in groups:
            group.product = F.linear
            group.silu_gated_product = None
