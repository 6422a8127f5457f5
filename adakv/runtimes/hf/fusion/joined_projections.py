"""Sibling projections computed as one matrix product for the duration of a block.

A decode step at batch 1 is a chain of matrix-vector products, one per weight matrix. Each decoder layer
of the supported families multiplies the same input by q_proj, k_proj and v_proj, and by gate_proj and
up_proj: five products where two would read the same bytes. Measured on an H200 (Llama-3.1-8B shape,
benchmarks/profile_decode_floor.py), the model's linear layers alone take 4.72 ms a step as separate
products and 3.97 ms joined, against 3.53 ms for reading the weights at copy bandwidth.

`joined_projections(model)` concatenates each such group's weights (and biases) into one tensor per group
and re-points every sibling's parameter at its rows of it, so memory does not grow (the separate tensors
are freed); the first sibling called on an input computes the joined product, the others return their
columns of it. On exit every sibling gets its own contiguous tensor back. Families that already store a
joined matrix (Phi3's qkv_proj and gate_up_proj) have nothing to join.

Inputs of more than JOINED_MAX_ROWS rows (prefills, long questions) are multiplied by each sibling's rows
of the joined matrix on their own: a product that large is bound by arithmetic, not by reading the
weights, so joining saves nothing there, while the joined product would hold every sibling's output
until the last one is consumed (at a 128k-token prefill of an 8B model the gate/up product is 7 GiB where
the unjoined MLP holds 3.5 GiB of it at a time). Those products are the unjoined model's, bit for bit.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Generator

import torch
import torch.nn.functional as F
from torch import nn

from adakv.models import attention_modules, forward_is_replaced

JOINED_MAX_ROWS = 128  # inputs with more rows (batch x tokens) are multiplied sibling by sibling

# (parent module attribute of a decoder layer, sibling nn.Linear names sharing one input)
SIBLING_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("mlp", ("gate_proj", "up_proj")),
)


@dataclass
class JoinedGroup:
    """Sibling nn.Linear modules whose weights are rows of one joined (sum of out_features, in_features) matrix."""

    linears: list[nn.Linear]
    weight: torch.Tensor | None  # None once split again (so that the joined matrix is freed group by group)
    bias: torch.Tensor | None
    parent: str = ""  # the decoder layer's attribute holding the siblings: "self_attn" or "mlp"
    bounds: list[tuple[int, int]] = field(default_factory=list)
    # (inputs, weight, bias) -> joined product; gemv_linears swaps in its GEMV routing within its block
    product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] = F.linear
    # An MLP's gate/up group only, set by gemv_linears within its block: (inputs, weight, bias) ->
    # silu(gate) * up in one product, or None for inputs it does not take (see `silu_gated_output`)
    silu_gated_product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor | None] | None = None
    # The joined product of the last input, reused by each sibling's call on that same tensor; dropped
    # when that input is freed (so a prefill does not keep one product per layer alive).
    _last_input: weakref.ref | None = None
    _last_output: torch.Tensor | None = None
    _token: int = 0

    def output_of(self, index: int, inputs: torch.Tensor) -> torch.Tensor:
        """(..., out_features of sibling `index`): its columns of the joined product of `inputs`, or for
        inputs of more than JOINED_MAX_ROWS rows its own product with its rows of the joined matrix."""
        self._refuse_weight_gradients()
        start, end = self.bounds[index]
        if inputs.numel() > JOINED_MAX_ROWS * inputs.shape[-1]:
            bias = None if self.bias is None else self.bias[start:end]
            return self.product(inputs, self.weight[start:end], bias)
        if self._last_input is None or self._last_input() is not inputs:
            self._token += 1
            self._last_input, self._last_output = weakref.ref(inputs), self.product(inputs, self.weight, self.bias)
            weakref.finalize(inputs, self._forget, self._token)
        return self._last_output[..., start:end]

    def silu_gated_output(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """(..., out_features of gate): silu(gate) * up of `inputs` computed in one product, for a group of
        (gate_proj, up_proj) within a block that offers it; None where it is not offered or not taken
        (then the caller multiplies the siblings' outputs itself)."""
        if self.silu_gated_product is None:
            return None
        self._refuse_weight_gradients()
        return self.silu_gated_product(inputs, self.weight, self.bias)

    def _refuse_weight_gradients(self) -> None:
        """The joined matrix is detached from the siblings' parameters: refuse a forward that would need
        gradients for them instead of cutting them silently."""
        if torch.is_grad_enabled() and any(linear.weight.requires_grad for linear in self.linears):
            raise RuntimeError(
                "join_projections computes the projections without gradients for their weights; run the model "
                "under torch.no_grad() or torch.inference_mode() (generate and the pipeline do), or use "
                "join_projections=False when training."
            )

    def _forget(self, token: int | None = None) -> None:
        if token is None or token == self._token:
            self._last_input = self._last_output = None


def _check_joinable(linears: list[nn.Linear], where: str) -> None:
    first = linears[0]
    for linear in linears:
        weight = linear.weight
        problem = None
        if type(linear) is not nn.Linear:
            problem = f"is a {type(linear).__name__}, not a plain nn.Linear (quantized or wrapped layers cannot be joined)"
        elif type(weight) is not nn.Parameter or type(weight.data) is not torch.Tensor:
            problem = "holds a tensor subclass (a tensor-parallel DTensor, a quantized tensor)"
        elif forward_is_replaced(linear):
            problem = "already has its forward replaced (an accelerate offload hook or another wrapper)"
        elif (weight.shape[1], weight.dtype, weight.device) != (first.weight.shape[1], first.weight.dtype, first.weight.device):
            problem = "differs from its siblings in input size, dtype or device"
        elif (linear.bias is None) != (first.bias is None):
            problem = "has a bias where a sibling has none (or the reverse)"
        if problem:
            raise ValueError(f"join_projections: {where} {problem}. Use join_projections=False with this model.")


# linear -> the group it is joined in, while joined (for the fused MLP forward of adakv/runtimes/hf/fusion/elementwise.py)
_GROUP_OF = weakref.WeakKeyDictionary()


def joined_group_of(linear: nn.Module) -> JoinedGroup | None:
    """The group `linear` is joined in, or None."""
    return _GROUP_OF.get(linear)


def _join(linears: list[nn.Linear], parent: str) -> JoinedGroup:
    """Concatenate the siblings' weights, then re-point each parameter at its rows (frees the originals)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    bias = torch.cat([linear.bias.detach() for linear in linears]) if linears[0].bias is not None else None
    group = JoinedGroup(linears=linears, weight=weight, bias=bias, parent=parent)
    start = 0
    for index, linear in enumerate(linears):
        end = start + linear.out_features
        group.bounds.append((start, end))
        linear.weight = nn.Parameter(weight[start:end], requires_grad=linear.weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias[start:end], requires_grad=linear.bias.requires_grad)
        linear.forward = lambda inputs, index=index: group.output_of(index, inputs)
        _GROUP_OF[linear] = group
        start = end
    return group


def _split(group: JoinedGroup) -> None:
    """Give every sibling its own contiguous parameters and its class forward back, then drop the joined
    matrix: on exit at most one group's weights exist twice, not the whole model's projections."""
    group._forget()
    for linear in group.linears:
        del linear.forward
        _GROUP_OF.pop(linear, None)
        linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    group.weight = group.bias = None


def sibling_groups(model: nn.Module) -> list[tuple[str, str, list[nn.Linear]]]:
    """(description, parent attribute, siblings) for every joinable group of every decoder layer, checked."""
    attention_layers = attention_modules(model)  # also refuses unsupported families
    layer_of = {  # id of a decoder layer's attention module -> that decoder layer
        id(module.self_attn): module
        for module in model.modules()
        if isinstance(getattr(module, "self_attn", None), nn.Module)
    }
    groups = []
    for attention in attention_layers:
        layer = layer_of[id(attention)]
        for parent_name, names in SIBLING_GROUPS:
            parent = getattr(layer, parent_name, None)
            if parent is None or not all(hasattr(parent, name) for name in names):
                continue  # e.g. Phi3 stores qkv_proj / gate_up_proj already joined
            linears = [getattr(parent, name) for name in names]
            where = f"layer {attention.layer_idx}'s {parent_name}.{'/'.join(names)}"
            _check_joinable(linears, where)
            groups.append((where, parent_name, linears))
    return groups


@contextmanager
def joined_projections(model: nn.Module) -> Generator[list[JoinedGroup], None, None]:
    """Within the block each decoder layer computes q/k/v and gate/up as one matrix product each; the
    model's outputs are the same up to the rounding of a different matrix-product kernel. Yields the groups."""
    groups: list[JoinedGroup] = []
    try:
        with torch.no_grad():
            for _, parent, linears in sibling_groups(model):
                groups.append(_join(linears, parent))
        yield groups
    finally:
        with torch.no_grad():
            for group in groups:
                _split(group)
