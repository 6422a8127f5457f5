"""PyramidKVPress: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv 2406.02069."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import PrefillContext
from ..fields import Real
from .snapkv import SnapKVPress


def compressed_layer_position(context: PrefillContext) -> tuple[int, int]:
    """(index of this layer among the full-attention layers, number of full-attention layers).

    Sliding-window layers (Gemma3) are never compressed, so the pyramid spans only the others."""
    layer_types = getattr(context.module.config, "layer_types", None)
    if layer_types is None:
        return context.layer_idx, context.num_layers
    full_layers = [index for index, kind in enumerate(layer_types) if kind == "full_attention"]
    return full_layers.index(context.layer_idx), len(full_layers)


def pyramid_keep_fraction(mean_keep: float, beta: float, position: int, num_layers: int) -> float:
    """Kept fraction of layer `position` (0 = first) out of `num_layers`, decreasing linearly.

    The first layer keeps (2 - 1/beta) * mean_keep and the last mean_keep / beta, so the mean over
    layers is mean_keep and first/last = 2 * beta - 1. A layer cannot keep more than everything: when
    the first layer's share exceeds 1 it is clamped to 1 and the last layer keeps 2 * mean_keep - 1
    instead, so the mean is still mean_keep (the slope is just flatter)."""
    if num_layers == 1:
        return mean_keep
    first = min((2.0 - 1.0 / beta) * mean_keep, 1.0)
    last = 2.0 * mean_keep - first
    return first + (last - first) * position / (num_layers - 1)


@dataclass
class PyramidKVPress(SnapKVPress):
    """SnapKV scores with per-layer budgets that shrink linearly with depth (lower layers spread
    attention widely, higher layers focus on few tokens). `compression_ratio` is the mean over the
    compressed layers; `beta` (>= 1) sets how steep the pyramid is (beta = 1: flat).

    score: (batch, kv_heads, seq), SnapKV's.
    """

    beta: float = 20.0

    field_rules = {"beta": Real(1.0)}

    def layer_compression_ratio(self, context: PrefillContext) -> float:
        if self.compression_ratio == 0:
            return 0.0
        position, num_layers = compressed_layer_position(context)
        keep = pyramid_keep_fraction(1.0 - self.compression_ratio, self.beta, position, num_layers)
        return min(max(1.0 - keep, 0.0), 1.0)
