"""Model helpers: which families are supported, where their attention layers are, how to recompute a
layer's queries from its input (needed by query-based scorers such as SnapKV), and how transformers'
tensor-parallel plan split a layer's heads over the ranks (`tensor_parallel_group`, `weight_for_local_heads`)."""

from __future__ import annotations

import inspect
import sys

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


KV_PROJECTIONS = ("k_proj", "qkv_proj")  # the projection whose sharding splits the KV heads


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (e.g. a tensor-parallel weight), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def tensor_parallel_group(module: nn.Module, local_heads: int):
    """The process group over which the attention `module`'s KV heads are split, or None.

    transformers' tensor-parallel plan turns the k projection's weight into a DTensor sharded on its
    output features. local_heads: the KV heads this process computed. When it equals the model's count the
    heads are replicated (e.g. Phi3's plan gathers the fused qkv output), and the selection is local. When
    it is smaller and no sharded weight explains it, the heads were split some other way, which a
    layer-wide selection cannot see: refused."""
    group = _sharding_group(module)
    total_heads = getattr(getattr(module, "config", None), "num_key_value_heads", None)
    if total_heads is None:  # not a transformers attention module (e.g. a test double): trust the weight
        return group
    if local_heads >= total_heads:
        return None
    if group is None:
        raise NotImplementedError(
            f"This process holds {local_heads} of the layer's {total_heads} KV heads, but its k projection is not a "
            "tensor-parallel DTensor: only transformers' tensor-parallel plan (tp_plan) is supported."
        )
    return group


def weight_for_local_heads(weight: torch.Tensor, in_features: int) -> torch.Tensor:
    """The columns of a row-sharded output projection that this process's heads feed: the local shard when
    the heads are split like the weight, the whole weight (gathered) when every rank holds every head."""
    local = local_tensor(weight)
    if local.shape[-1] == in_features or local is weight:
        return local
    return weight.full_tensor()


def _sharding_group(module: nn.Module):
    for name in KV_PROJECTIONS:
        weight = getattr(getattr(module, name, None), "weight", None)
        mesh = getattr(weight, "device_mesh", None)
        if mesh is None:
            continue
        if not any(placement.is_shard() for placement in weight.placements):
            return None
        if mesh.ndim != 1:
            raise NotImplementedError(
                f"{type(module).__name__}.{name} is sharded over a {mesh.ndim}-D device mesh; adakv's cross-rank "
                "head allocation supports a 1-D tensor-parallel mesh only."
            )
        return mesh.get_group()
    return None


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
    """Rotate x (batch, heads, seq, head_dim) by cos/sin (batch, seq, rotary_dim)."""
    return rotate(x, cos.unsqueeze(1), sin.unsqueeze(1))


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


def queries(module: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Rotated queries exactly as the layer computed them: (batch, num_heads, seq, head_dim)."""
    cos, sin = position_embeddings
    return apply_rope(pre_rope_queries(module, hidden_states), cos, sin)


def check_parameters_on_cuda(model: nn.Module, switch: str, what: str) -> None:
    """Refuse, for the option `switch` whose `what` (e.g. "Triton kernels") run on CUDA, a model with
    parameters elsewhere."""
    devices = {parameter.device.type for parameter in model.parameters()}
    if devices != {"cuda"}:
        raise ValueError(
            f"{switch} runs {what} on CUDA; this model has parameters on {sorted(devices)}. "
            f"Move the model to a CUDA device or use {switch}=False."
        )


def forward_is_replaced(module: nn.Module) -> bool:
    """True when something already swapped `module`'s forward (an accelerate offload hook, another wrapper)."""
    return "forward" in module.__dict__ or getattr(module, "_hf_hook", None) is not None


CACHE_KEYWORDS = ("cache", "past_key_values")  # transformers renamed `past_key_values` to `cache`


def cache_argument(kwargs: dict):
    """The cache a forward (of a model or an attention module) was given under either name, or None."""
    return next((kwargs[name] for name in CACHE_KEYWORDS if kwargs.get(name) is not None), None)


def cache_argument_name(model: nn.Module) -> str:
    """Name of the cache argument of `model.forward`: "cache" in newer transformers, else "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
