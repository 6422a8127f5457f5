"""Residual adds folded into the RMSNorm that follows them, part of `fused_elementwise`.

A decoder layer of the Llama-structured families (LLAMA_STRUCTURED_LAYERS) computes, in transformers 5:

    h = x + attn(input_norm(x));   out = h + mlp(post_norm(h))

and the next layer (or the model's final norm) starts with next_norm(out). Each `+` is a kernel of its
own. `layer_forward` computes the same with `add_rms_norm` kernels, which write the rounded sum and its
norm in one launch: (h, post_norm(h)) after the attention, (out, next_norm(out)) after the MLP. The second
norm belongs to the next module, so it is kept in `NormsAhead` and the next norm's fused forward returns
it when called on that very tensor (an identity check, as joined projections do): two kernels fewer per
layer. The arithmetic is transformers': the sum is rounded to the dtype before it is normalised.

Other layer classes (Phi3's residual dropouts, Gemma3's four norms) keep their forward. Calls with
positional arguments beyond the hidden states run the class forward; sums of mixed dtypes or that record
gradients are computed as transformers does (separate add, then the norm module).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# Decoder layers whose forward is norm -> attention -> add -> norm -> MLP -> add, returning the hidden states
LLAMA_STRUCTURED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


@dataclass(frozen=True)
class NormSpec:
    """An RMSNorm module and what its arithmetic needs (see elementwise.NORM_STYLES)."""

    module: nn.Module
    eps: float
    weight_offset: float
    scale_in_fp32: bool

    def arguments(self) -> tuple:
        return self.module.weight, self.eps, self.weight_offset, self.scale_in_fp32


class NormsAhead:
    """Norm outputs computed ahead, by the kernel that produced their input: norm -> (input, output). One
    entry per norm, taken (removed) by the norm's next call."""

    def __init__(self):
        self._ahead: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def put(self, norm: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> None:
        self._ahead[id(norm)] = (weakref.ref(inputs), output)

    def take(self, norm: nn.Module, inputs: torch.Tensor) -> torch.Tensor | None:
        """The output computed ahead for exactly `inputs` (the same tensor object), else None."""
        entry = self._ahead.pop(id(norm), None)
        if entry is None or entry[0]() is not inputs:
            return None
        return entry[1]


def layer_forward(
    layer: nn.Module, post_norm: NormSpec, next_norm: NormSpec, add_rms_norm: Callable, ahead: NormsAhead,
    device_type: str | None,
) -> Callable:
    """The decoder layer's forward with both residual adds folded into the norms after them.
    add_rms_norm(residual, update, weight, eps, weight_offset, scale_in_fp32) -> (sum, its norm)."""

    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or (device_type is not None and hidden_states.device.type != device_type):
            return type(layer).forward(layer, hidden_states, *args, **kwargs)
        attention_output = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)[0]
        if not _addable(hidden_states, attention_output):  # transformers' own arithmetic from here
            hidden_states = hidden_states + attention_output
            return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))
        hidden_states, normed = add_rms_norm(hidden_states, attention_output, *post_norm.arguments())
        del attention_output  # held no longer than transformers' forward holds them (prefill memory)
        mlp_output = layer.mlp(normed)
        del normed
        if not _addable(hidden_states, mlp_output):
            return hidden_states + mlp_output
        hidden_states, next_normed = add_rms_norm(hidden_states, mlp_output, *next_norm.arguments())
        ahead.put(next_norm.module, hidden_states, next_normed)
        return hidden_states

    return forward


def _addable(residual: torch.Tensor, update: torch.Tensor) -> bool:
    """Same shape and dtype, no gradients to record (the kernels have no backward)."""
    needs_gradients = torch.is_grad_enabled() and (residual.requires_grad or update.requires_grad)
    return residual.shape == update.shape and residual.dtype == update.dtype and not needs_gradients
