"""Backends: how a keep mask is applied to a layer's cache, and which one a model gets.

"evict" is the default: a press whose `backend` is not set (None) evicts. It gives the same results
as "mask", really frees memory (KV at ratio r is (1 - r) of dense plus < 2%) and decodes through
adakv's own CUDA/Triton kernels on GPU. Where the evict backend cannot serve the model (see
`evict_refusal`, decided once per block from the model's config), such a press falls back to "mask"
with one `BackendFallbackWarning` naming the reason; an explicit backend="evict" raises instead. "mask"
stays available (backend="mask") for research on masks: it needs nothing beyond the model's own
attention and accepts any mask and model option.

kv_dtype (a press's field): None keeps the model's dtype; "float8_e4m3fn" stores the evict backend's rows in
fp8 with per-row scales (flat.py). The mask backend keeps the dense cache in the model's dtype and refuses it
(`kv_dtype_refusal`).
"""

from __future__ import annotations

import torch

from adakv.kernels.fp8_reference import KV_DTYPES

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


def kv_dtype_refusal(backend: str | None, kv_dtype: str | None) -> str | None:
    """Why `backend` cannot store rows in `kv_dtype` (a press's field values), or None when it can."""
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        return f"kv_dtype must be None (the model's dtype) or one of {KV_DTYPES}, got {kv_dtype!r}."
    if kv_dtype is not None and backend == "mask":
        return (
            f"kv_dtype={kv_dtype!r} is stored by the evict backend's flat cache; backend 'mask' keeps the dense cache "
            "in the model's dtype and its attention cannot read fp8. Use backend='evict' (or leave it unset) with "
            "kv_dtype, or kv_dtype=None with backend='mask'."
        )
    return None


def make_compressed_layer(
    backend: str, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, config, kv_dtype: str | None = None
) -> CompressedLayer:
    """Build the cache layer for `backend` from the dense context keys/values (batch, kv_heads, seq,
    head_dim) and the keep mask (batch, kv_heads, seq), storing rows in `kv_dtype` (None: the keys' dtype)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    refusal = kv_dtype_refusal(backend, kv_dtype)
    if refusal is not None:
        raise ValueError(refusal)
    if backend == "mask":
        return MaskedLayer(keys, values, keep, config)
    return FlatHeadwiseLayer(keys, values, keep, config, kv_dtype=None if kv_dtype is None else getattr(torch, kv_dtype))


