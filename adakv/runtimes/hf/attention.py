"""Attention functions that read compressed cache layers, registered with transformers'
`AttentionInterface` under the names "adakv_sdpa" and "adakv_eager".

While a press is active, the model's attention implementation is switched from "sdpa"/"eager" to
the adakv twin. For layers that hold no compressed state the twin calls the original function
unchanged; for a mask layer it folds the per-head keep mask into the attention mask first; for a
flat layer (backend "evict") it runs variable-length attention over the flat rows
(adakv/cache/flat_attention.py) and ignores the dense key/value arguments.

A press's replay of the context (KVzip's reconstruction, replay.CacheReplay) runs under "adakv_replay_sdpa"
/ "adakv_replay_eager": a module that carries a replay attention (`REPLAY_ATTRIBUTE`) runs it instead of
the model's attention function, every other module the original function.
"""

from __future__ import annotations

import sys
import weakref
from functools import partial

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from adakv.kernels.device import on_device_of
from adakv.cache import ADAKV_ATTENTION_PREFIX, CompressedLayer
from adakv.cache.flat_attention import flat_attention

CACHE_ATTRIBUTE = "adakv_cache"  # set on attention modules by the session's pre-forward hook
REPLAY_ATTRIBUTE = "adakv_replay_attention"  # set on attention modules by CacheReplay while it runs
REPLAY_PREFIX = ADAKV_ATTENTION_PREFIX + "replay_"


def _eager_forward_of(module: nn.Module):
    """The eager attention function of the module's own modeling file (handles softcapping etc.)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _compressed_layer(module: nn.Module):
    cache = getattr(module, CACHE_ATTRIBUTE, None)
    if cache is None or module.layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[module.layer_idx]
    return layer if isinstance(layer, CompressedLayer) else None


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


def real_token_mask(attention_mask: torch.Tensor | None, batch: int, kv_length: int, device) -> torch.Tensor:
    """(batch, kv_length) True for real tokens. Padding keys are those the last query may not attend."""
    if attention_mask is None:  # no padding (and no need to build a seq x seq causal mask)
        return torch.ones(batch, kv_length, dtype=torch.bool, device=device)
    last_query = attention_mask[:, :, -1:]
    return allowed_positions(last_query, 1, kv_length, device)[:, 0, -1].expand(batch, kv_length)


def headwise_mask(
    attention_mask: torch.Tensor | None, keep: torch.Tensor, query_length: int, num_key_value_groups: int
) -> torch.Tensor:
    """Combine the model's mask with a per-KV-head keep mask.

    keep: (batch, kv_heads, kv_length) -> (batch, kv_heads * groups, query_length, kv_length) bool."""
    kv_length = keep.shape[-1]
    allowed = allowed_positions(attention_mask, query_length, kv_length, keep.device)
    per_query_head = keep.repeat_interleave(num_key_value_groups, dim=1)[:, :, None, :]
    return allowed & per_query_head


def adakv_attention(base: str, module: nn.Module, query, key, value, attention_mask, **kwargs):
    """query: (batch, heads, q_len, head_dim); key/value: (batch, kv_heads, kv_len, head_dim)."""
    base_forward = sdpa_attention_forward if base == "sdpa" else _eager_forward_of(module)
    layer = _compressed_layer(module)
    if layer is None:
        return base_forward(module, query, key, value, attention_mask, **kwargs)
    if layer.backend == "evict":  # the flat rows, not the dense key/value arguments
        with on_device_of(query):
            return evict_attention(module, query, layer, attention_mask, **kwargs)
    mask = headwise_mask(attention_mask, layer.keep_mask(key.shape[-2]), query.shape[-2], module.num_key_value_groups)
    if base == "eager":
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~mask, torch.finfo(query.dtype).min
        )
    return base_forward(module, query, key, value, mask, **kwargs)


def appended_left_padding(attention_mask: torch.Tensor, past_length: int, query_length: int) -> torch.Tensor | None:
    """(batch,) leading tokens of the new block that are padding, or None when there is none.

    The model's mask (batch or 1, 1, query_length, past_length + query_length) hides padding keys; the new
    tokens of each batch row must be left padding followed by real tokens that attend causally, the
    shape a batch of questions padded to one length has. Anything else raises NotImplementedError."""
    kv_length = past_length + query_length
    allowed = allowed_positions(attention_mask, query_length, kv_length, attention_mask.device)[:, 0, :, past_length:]
    padding_keys = ~allowed[:, -1, :]  # (batch, query_length): new tokens the last query may not see
    padding = padding_keys.sum(-1)
    if not bool(padding.any()):
        return None
    positions = torch.arange(query_length, device=allowed.device)
    expected_keys = positions[None, :] >= padding[:, None]
    causal = positions[:, None] >= positions[None, :]
    expected = causal[None] & expected_keys[:, None, :]
    real_queries = expected_keys[:, :, None]
    if not (torch.equal(padding_keys, ~expected_keys) and bool(((allowed == expected) | ~real_queries).all())):
        raise NotImplementedError(
            "The evict backend supports new tokens that are left padding followed by real tokens attending "
            "causally (a question batch padded on the left); this attention mask hides other new tokens "
            "(right padding, or a custom mask). Pad on the left, or use backend='mask'."
        )
    return padding


# (weak reference to the mask, past length, query length, its padding): every layer of one forward gets the
# same mask tensor, so it is analysed (one host synchronisation) once per forward, not once per layer
_last_padding: tuple = (None, -1, -1, None)


def _padding_of(attention_mask: torch.Tensor, past_length: int, query_length: int) -> torch.Tensor | None:
    global _last_padding
    mask_reference, past, length, padding = _last_padding
    if mask_reference is not None and mask_reference() is attention_mask and (past, length) == (past_length, query_length):
        return padding
    padding = appended_left_padding(attention_mask, past_length, query_length)
    _last_padding = (weakref.ref(attention_mask), past_length, query_length, padding)
    return padding


def note_appended_padding(module: nn.Module, hidden_states: torch.Tensor, attention_mask) -> None:
    """Before a multi-token append to a flat layer, tell the layer which leading tokens of each batch row
    are padding, so it never writes them (called from the press's forward pre-hook on `self_attn`)."""
    layer = _compressed_layer(module)
    query_length = hidden_states.shape[1]
    if layer is None or layer.stores_padding_rows or attention_mask is None or query_length == 1:
        return
    padding = _padding_of(attention_mask, layer.get_seq_length(), query_length)
    if padding is not None:
        layer.skip_leading_tokens(padding.expand(layer.batch_size))


def evict_attention(module: nn.Module, query, layer: CompressedLayer, attention_mask, **kwargs):
    """query: (batch, heads, q_len, head_dim) -> ((batch, q_len, heads, head_dim), None)."""
    if kwargs.get("softcap") is not None or getattr(module.config, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError("The evict backend does not support attention logit softcapping; use backend='mask'.")
    if query.shape[0] != layer.batch_size:
        raise ValueError(f"Query batch {query.shape[0]} differs from the cache's batch {layer.batch_size}.")
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    output = flat_attention(query, layer, scaling)
    if layer.last_append_padding is not None and query.shape[-2] > 1:
        # padding queries saw too few rows (maybe none): zero them so no NaN reaches dense layers
        steps = torch.arange(query.shape[-2], device=output.device)
        output = output.masked_fill((steps[None, :] < layer.last_append_padding[:, None])[..., None, None], 0)
    return output, None


def replay_attention(base: str, module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The module's replay attention (query, key, value) -> (output (batch, q_len, heads, head_dim), None)
    where CacheReplay set one, else the model's own `base` function."""
    attend = getattr(module, REPLAY_ATTRIBUTE, None)
    if attend is not None:
        return attend(query, key, value), None
    base_forward = sdpa_attention_forward if base == "sdpa" else _eager_forward_of(module)
    return base_forward(module, query, key, value, attention_mask, **kwargs)


BASE_IMPLEMENTATIONS = {"sdpa": sdpa_mask, "eager": eager_mask}


def register_attention_functions() -> None:
    """Make "adakv_sdpa", "adakv_eager" and their replay twins known to transformers (idempotent)."""
    for base, mask_function in BASE_IMPLEMENTATIONS.items():
        for prefix, function in ((ADAKV_ATTENTION_PREFIX, adakv_attention), (REPLAY_PREFIX, replay_attention)):
            AttentionInterface.register(prefix + base, partial(function, base))
            AttentionMaskInterface.register(prefix + base, mask_function)


def set_attention_implementation(model: nn.Module, implementation: str) -> None:
    """Set `implementation` on the model's config and on every sub-module's config (multimodal models hold several)."""
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            configs[id(config)] = config
    for config in configs.values():
        config._attn_implementation = implementation
