"""Attention functions that read compressed cache layers, registered with transformers'
`AttentionInterface` under the names "adakv_sdpa" and "adakv_eager".

While a press is active, the model's attention implementation is switched from "sdpa"/"eager" to
the adakv twin. For layers that hold no compressed state the twin calls the original function
unchanged; for a `MaskedLayer` it folds the per-head keep mask into the attention mask first; for a
`FlatHeadwiseLayer` (backend "evict") it runs variable-length attention over the flat rows
(adakv/varlen.py) and ignores the dense key/value arguments.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from functools import partial

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .cache import ADAKV_ATTENTION_PREFIX, MaskedLayer
from .flat_cache import FlatHeadwiseLayer
from .varlen import flat_attention

CACHE_ATTRIBUTE = "adakv_cache"  # set on attention modules by the press's pre-forward hook


def _eager_forward_of(module: nn.Module):
    """The eager attention function of the module's own modeling file (handles softcapping etc.)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _compressed_layer(module: nn.Module):
    cache = getattr(module, CACHE_ATTRIBUTE, None)
    if cache is None or module.layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[module.layer_idx]
    return layer if isinstance(layer, (MaskedLayer, FlatHeadwiseLayer)) else None


def allowed_positions(attention_mask: torch.Tensor | None, query_length: int, kv_length: int, device) -> torch.Tensor:
    """The model's own mask as bool, True = may attend: (batch or 1, 1, query_length, kv_length).

    `None` means plain causal attention, aligned so the last query sees the last key."""
    if attention_mask is None:
        query_positions = torch.arange(kv_length - query_length, kv_length, device=device)
        return (query_positions[:, None] >= torch.arange(kv_length, device=device)[None, :])[None, None]
    attention_mask = attention_mask[..., :kv_length]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2  # additive float mask: 0 or -inf/min


def headwise_mask(
    attention_mask: torch.Tensor | None, keep: torch.Tensor, query_length: int, num_key_value_groups: int
) -> torch.Tensor:
    """Combine the model's mask with a per-KV-head keep mask.

    keep: (batch, kv_heads, kv_length) -> (batch, kv_heads * groups, query_length, kv_length) bool."""
    kv_length = keep.shape[-1]
    allowed = allowed_positions(attention_mask, query_length, kv_length, keep.device)
    per_query_head = keep.repeat_interleave(num_key_value_groups, dim=1)[:, :, None, :]
    return allowed & per_query_head


def on_device_of(tensor: torch.Tensor):
    """Make the tensor's GPU the current CUDA device for the block. Triton launches its kernels on the
    current device, which is not the layer's when a model is split over GPUs (device_map): accelerate
    moves the tensors between layers but leaves the current device alone. On one GPU (the decode hot
    path) this costs one device-index read per layer."""
    if tensor.is_cuda and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return nullcontext()


def adakv_attention(base: str, module: nn.Module, query, key, value, attention_mask, **kwargs):
    """query: (batch, heads, q_len, head_dim); key/value: (batch, kv_heads, kv_len, head_dim)."""
    base_forward = sdpa_attention_forward if base == "sdpa" else _eager_forward_of(module)
    layer = _compressed_layer(module)
    if layer is None:
        return base_forward(module, query, key, value, attention_mask, **kwargs)
    if isinstance(layer, FlatHeadwiseLayer):
        with on_device_of(query):
            return evict_attention(module, query, layer, attention_mask, **kwargs)
    mask = headwise_mask(attention_mask, layer.keep_mask(key.shape[-2]), query.shape[-2], module.num_key_value_groups)
    if base == "eager":
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~mask, torch.finfo(query.dtype).min
        )
    return base_forward(module, query, key, value, mask, **kwargs)


def check_appended_tokens_unpadded(attention_mask: torch.Tensor | None, layer: FlatHeadwiseLayer, query_length: int):
    """The flat layout attends every appended token causally; refuse masks that hide some of them
    (e.g. a batch of questions padded to one length). Checked for multi-token appends only."""
    if attention_mask is None or query_length == 1:
        return
    kv_length = layer.get_seq_length()
    allowed = allowed_positions(attention_mask, query_length, kv_length, attention_mask.device)
    causal = allowed_positions(None, query_length, kv_length, attention_mask.device)
    appended = slice(layer.context_length, kv_length)
    if not torch.equal(allowed[..., appended].expand(layer.batch_size, 1, -1, -1), causal[..., appended].expand(layer.batch_size, 1, -1, -1)):
        raise NotImplementedError(
            "The evict backend attends every token added after the compressed context; this attention mask "
            "hides some of them (padding inside a question?). Give every batch row a question of the same "
            "length, or use backend='mask'."
        )


def evict_attention(module: nn.Module, query, layer: FlatHeadwiseLayer, attention_mask, **kwargs):
    """query: (batch, heads, q_len, head_dim) -> ((batch, q_len, heads, head_dim), None)."""
    if kwargs.get("softcap") is not None or getattr(module.config, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError("The evict backend does not support attention logit softcapping; use backend='mask'.")
    if query.shape[0] != layer.batch_size:
        raise ValueError(f"Query batch {query.shape[0]} differs from the cache's batch {layer.batch_size}.")
    check_appended_tokens_unpadded(attention_mask, layer, query.shape[-2])
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    return flat_attention(query, layer, scaling), None


BASE_IMPLEMENTATIONS = {"sdpa": sdpa_mask, "eager": eager_mask}


def register_attention_functions() -> None:
    """Make "adakv_sdpa" and "adakv_eager" known to transformers (idempotent)."""
    for base, mask_function in BASE_IMPLEMENTATIONS.items():
        name = ADAKV_ATTENTION_PREFIX + base
        AttentionInterface.register(name, partial(adakv_attention, base))
        AttentionMaskInterface.register(name, mask_function)
