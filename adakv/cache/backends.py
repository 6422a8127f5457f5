"""Backends: how a keep mask is applied to a layer's cache, and which one a model gets.

"evict" is the default: a press whose `backend` is not set (None) evicts. It gives the same results
as "mask", really frees memory (KV at ratio r is (1 - r) of dense plus < 2%) and decodes through
adakv's own CUDA/Triton kernels on GPU. Where the evict backend cannot serve the model (see
`evict_refusal`, decided once per block from the model's config), such a press falls back to "mask"
with one `BackendFallbackWarning` naming the reason; an explicit backend="evict" raises instead. "mask"
stays available (backend="mask") for research on masks: it needs nothing beyond the model's own
attention and accepts any mask and model option.
"""

from __future__ import annotations

import torch

from .flat import FlatHeadwiseLayer
from .layer import CompressedLayer
from .masked import MaskedLayer

BACKENDS = ("mask", "evict")
DEFAULT_BACKEND = "evict"  # what a press whose `backend` is None (not set) uses


class BackendFallbackWarning(UserWarning):
    """A press with no backend set falls back from "evict" to "mask" for a model the evict backend cannot serve."""


def evict_refusal(config) -> str | None:
    """Why the evict backend cannot serve a model with this config (a sentence), or None when it can."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "attn_logit_softcapping", None) is not None:
        return (
            f"the model caps its attention logits (config.attn_logit_softcapping={text_config.attn_logit_softcapping}), "
            "which the evict backend's attention kernels do not apply"
        )
    return None


def make_compressed_layer(
    backend: str, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, config
) -> CompressedLayer:
    """Build the cache layer for `backend` from the dense context keys/values (batch, kv_heads, seq,
    head_dim) and the keep mask (batch, kv_heads, seq)."""
    if backend == "mask":
        return MaskedLayer(keys, values, keep, config)
    if backend == "evict":
        return FlatHeadwiseLayer(keys, values, keep, config)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")


