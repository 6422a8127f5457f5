"""Model helpers: which families are supported, where their attention layers are, and how to
recompute a layer's queries from its input (needed by query-based scorers such as SnapKV)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

# model_type -> human readable family name
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi3",
    "gemma3_text": "Gemma3 (text)",
}
SUPPORTED_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_supported_model(model: nn.Module) -> None:
    """Raise a ValueError naming the supported families when `model` is not one of them."""
    model_type = getattr(_text_config(model), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(f"{name} ({key})" for key, name in SUPPORTED_MODEL_TYPES.items())
        raise ValueError(f"adakv does not support model_type={model_type!r}. Supported families: {supported}.")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The `self_attn` module of every decoder layer, in layer order."""
    check_supported_model(model)
    modules = [module for name, module in model.named_modules() if name.endswith("self_attn")]
    if not modules:
        raise ValueError(f"Found no `self_attn` modules in {type(model).__name__}.")
    return modules


def is_full_attention_layer(module: nn.Module) -> bool:
    """True for layers that attend to the whole context; sliding-window layers are never compressed."""
    config = module.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return layer_types[module.layer_idx] == "full_attention"
    if getattr(config, "use_sliding_window", True) is False:
        return True
    return getattr(config, "sliding_window", None) is None


def num_key_value_heads(module: nn.Module) -> int:
    return module.config.num_key_value_heads


def _project_queries(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, seq, num_heads * head_dim), before any norm or rotation."""
    if hasattr(module, "q_proj"):
        return module.q_proj(hidden_states)
    if hasattr(module, "qkv_proj"):  # Phi3 fuses q, k and v into one projection
        query_width = module.config.num_attention_heads * module.head_dim
        return module.qkv_proj(hidden_states)[..., :query_width]
    raise ValueError(f"Cannot find the query projection of {type(module).__name__}.")


def pre_rope_queries(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Queries of `hidden_states` before rotary embedding.

    hidden_states: (batch, seq, hidden) -> (batch, num_heads, seq, head_dim).
    """
    batch, seq_len, _ = hidden_states.shape
    queries = _project_queries(module, hidden_states).view(batch, seq_len, -1, module.head_dim)
    if hasattr(module, "q_norm"):  # Qwen3 and Gemma3 normalise each query head
        queries = module.q_norm(queries)
    return queries.transpose(1, 2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, heads, seq, head_dim) by cos/sin (batch, seq, rotary_dim).

    When rotary_dim < head_dim (partial rotary, e.g. some Phi3 models) only the first rotary_dim
    channels rotate."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = rotated * cos.unsqueeze(1) + rotate_half(rotated) * sin.unsqueeze(1)
    return torch.cat((rotated, passed), dim=-1) if passed.numel() else rotated


def queries(module: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Rotated queries exactly as the layer computed them: (batch, num_heads, seq, head_dim)."""
    cos, sin = position_embeddings
    return apply_rope(pre_rope_queries(module, hidden_states), cos, sin)


def cache_argument_name(model: nn.Module) -> str:
    """Name of the cache argument of `model.forward`: "cache" in newer transformers, else "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
