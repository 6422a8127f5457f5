"""KeyRerotationPress: after pruning, move each kept key to the position it would have in a cache
holding only the kept tokens (the idea behind StreamingLLM's "positions within the cache", Xiao et
al., "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453).

Also home of the small RoPE helpers that presses needing rotations at arbitrary positions share.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

from adakv.models import rotate_half

from .base import BasePress, PrefillContext, check_compression_ratio, check_is_press


def rotary_embedding_of(module: nn.Module) -> nn.Module:
    """A fresh instance of the rotary embedding class of the attention module's model family, built
    from the module's config (e.g. LlamaAttention -> LlamaRotaryEmbedding), so that rope scaling,
    partial rotary (Phi3) and per-layer-type frequencies (Gemma3) are exactly the model's."""
    modeling = sys.modules[type(module).__module__]
    name = type(module).__name__.replace("Attention", "RotaryEmbedding")
    rotary_class = getattr(modeling, name, None)
    if rotary_class is None:
        raise ValueError(f"Cannot find the rotary embedding class {name} for {type(module).__name__}.")
    return rotary_class(module.config)


def rope_cos_sin(module: nn.Module, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the module's RoPE at integer positions: (batch, n) -> two (batch, n, rotary_dim) float32."""
    rotary = rotary_embedding_of(module).to(position_ids.device)
    kwargs = {}
    if "layer_type" in inspect.signature(rotary.forward).parameters:  # Gemma3: frequencies per layer type
        kwargs["layer_type"] = module.config.layer_types[module.layer_idx]
    anchor = torch.empty(0, dtype=torch.float32, device=position_ids.device)  # only its dtype/device are read
    with torch.no_grad():
        cos, sin = rotary(anchor, position_ids, **kwargs)
    return cos.float(), sin.float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to the last dimension of x (..., head_dim); cos/sin (..., rotary_dim) broadcast
    against x's leading dims. Channels past rotary_dim (partial rotary) pass unchanged."""
    rotary_dim = cos.shape[-1]
    turned, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    turned = turned * cos + rotate_half(turned) * sin
    return torch.cat((turned, passed), dim=-1) if passed.shape[-1] else turned


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `rotate`. cos/sin may carry an attention scaling m (cos = m cos θ), hence / m²."""
    rotary_dim = cos.shape[-1]
    turned, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    turned = (turned * cos - rotate_half(turned) * sin) / (cos * cos + sin * sin)
    return torch.cat((turned, passed), dim=-1) if passed.shape[-1] else turned


def rerotate_kept_keys(context: PrefillContext, keep: torch.Tensor) -> None:
    """Rotate each kept key (batch, kv_heads, seq, head_dim) in place from its position to its rank
    among the kept positions of its (batch, head). Pruned keys are left untouched."""
    keys = context.keys
    batch, kv_heads, seq_len, _ = keys.shape
    new_positions = (keep.long().cumsum(-1) - 1).clamp(min=0)  # (batch, kv_heads, seq)
    new_cos, new_sin = rope_cos_sin(context.module, new_positions.reshape(batch, kv_heads * seq_len))
    new_cos = new_cos.view(batch, kv_heads, seq_len, -1)
    new_sin = new_sin.view(batch, kv_heads, seq_len, -1)
    old_cos, old_sin = (t.float()[:, None] for t in context.position_embeddings)  # (batch, 1, seq, rotary_dim)
    moved = rotate(unrotate(keys.float(), old_cos, old_sin), new_cos, new_sin)
    keys.copy_(torch.where(keep[..., None], moved.to(keys.dtype), keys))


@dataclass
class KeyRerotationPress(BasePress):
    """Prunes with the inner press, then re-rotates every kept key so that the kept keys of each head
    sit at contiguous positions 0, 1, ..., n_kept - 1 in their original order, as if the cache had
    only ever held them. Works per head, so also around AdaptivePress.

    The rotation is undone with the cos/sin the layer used (no assumption on the original
    positions) and redone at the new positions with the model's own rotary embedding. The keys are
    changed in place in `context.keys`, the cache's tensor, so this press must be the outermost one
    (ChunkPress and ComposedPress refuse it as an inner press).
    """

    press: BasePress

    def __post_init__(self):
        super().__post_init__()
        check_is_press(self.press, "KeyRerotationPress")

    @property
    def compression_ratio(self) -> float:
        return self.press.compression_ratio

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        check_compression_ratio(value)
        self.press.compression_ratio = value

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        keep = self.press.compress(context)
        if keep is not None:
            rerotate_kept_keys(context, keep)
        return keep
