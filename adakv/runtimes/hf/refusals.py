"""What a press block refuses, and warns about, rather than compressing nothing or the wrong tokens.

A press compresses the full-attention layers of a transformers `DynamicCache` during the context prefill.
Anything else would run without a word and leave the cache as it was, or compress tokens that are not the
context: another cache class (StaticCache, QuantizedCache, a `cache_implementation` other than "dynamic"), an
offloading DynamicCache (its layers move to the CPU between forwards, which compressed layers are not built for),
no cache at all (`use_cache=False`), a batch padded on the right, and assisted generation (its draft tokens
would be compressed as context, and rejected drafts rolled back out of a compressed cache). `PressSession`'s
hooks raise these before a layer runs; `guarded_generate` raises them when `model.generate` is called,
before anything is allocated.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import wraps
from typing import Generator

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from adakv.cache import CompressedLayer

# generate() arguments (and GenerationConfig fields) that make generate draft tokens and roll back rejected ones
ASSISTED_GENERATION_ARGUMENTS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")

WHAT_TO_PASS = (
    "Pass no cache (the model and generate() then make a DynamicCache) or a transformers.DynamicCache(), and "
    "leave cache_implementation unset or 'dynamic' (in generate() and in the generation config)."
)

EVICT_ATTENTIONS_WARNING = (
    "output_attentions=True under backend 'evict': forwards over a compressed cache (decode steps, question "
    "tokens) return no attention weights, since attention runs over the kept rows only; the context prefill's "
    "weights are returned as usual. Use backend='mask' to get weights for every step."
)


OFFLOADING_REFUSAL = (
    "An offloading cache (DynamicCache(offloading=True), or cache_implementation='offloaded') moves each layer's "
    "keys and values to the CPU between forwards, but the layers {press} compresses are not built to be offloaded "
    "(their per-head offsets, lengths and keep masks stay on the model's device, a CUDA-graph decode reads fixed "
    "buffer addresses), so adakv refuses the combination rather than run it untested. Compress instead of "
    "offloading (backend 'evict' frees the pruned pairs): pass a DynamicCache() without offloading, or no cache."
)


def cache_refusal(cache, press_name: str = "the press") -> str | None:
    """Why a press cannot compress `cache`, or None when it can (a DynamicCache that does not offload)."""
    if isinstance(cache, DynamicCache):
        return OFFLOADING_REFUSAL.format(press=press_name) if getattr(cache, "offloading", False) else None
    return (
        f"adakv presses compress a transformers DynamicCache, but got a {type(cache).__name__}, which the press "
        f"would leave uncompressed. {WHAT_TO_PASS}"
    )


def layer_refusal(layer, module: nn.Module) -> str | None:
    """Why the press cannot compress, or read, the cache layer `layer` of full-attention `module`."""
    if isinstance(layer, CompressedLayer):
        if getattr(layer, "config", module.config) is not module.config:
            return (
                f"This cache holds a layer compressed by an adakv press for another model (backend {layer.backend!r}); "
                "a compressed cache can only be continued by the model that compressed it. Prefill this model's "
                "own cache."
            )
        return None
    if type(layer) is DynamicLayer:
        return None
    return (
        f"adakv presses compress DynamicCache layers (DynamicLayer), but layer {module.layer_idx} of this cache is "
        f"a {type(layer).__name__}, which the press would leave uncompressed. {WHAT_TO_PASS}"
    )


def no_cache_refusal(press_name: str) -> str:
    return (
        f"This forward keeps no cache (use_cache=False), so {press_name} has nothing to compress and the model "
        "would run as if there were no press. Drop use_cache=False inside the press block (or run the model "
        "outside it)."
    )


def right_padding_refusal(real: torch.Tensor) -> str | None:
    """Why a context whose real tokens are `real` (batch, kv_length) bool cannot be compressed: a row padded on
    the right (a padding token after a real one), or a row with no real token. None when every row is real
    tokens after optional left padding."""
    pad_after_real = real[:, :-1] & ~real[:, 1:]
    bad_rows = (pad_after_real.any(-1) | ~real.any(-1)).nonzero().flatten().tolist()
    if not bad_rows:
        return None
    return (
        f"Row(s) {bad_rows} of this batch are padded on the right (padding after the real tokens): presses score "
        "each row by its last tokens, which would be padding, and new tokens would follow the padding. Pad on the "
        "left: tokenizer.padding_side = 'left'."
    )


def generate_refusal(model: nn.Module, press_name: str, kwargs: dict) -> str | None:
    """Why `model.generate(**kwargs)` cannot run inside a press block, or None."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def setting(name: str):
        return kwargs[name] if name in kwargs else getattr(config, name, None)

    assisted = [name for name in ASSISTED_GENERATION_ARGUMENTS if setting(name) not in (None, False)]
    if assisted:
        return (
            f"Assisted generation ({', '.join(assisted)}) cannot run inside a press block: its draft tokens would "
            f"be compressed by {press_name} as context, and rejected drafts rolled back out of a compressed cache. "
            "Generate without an assistant or prompt lookup inside the block."
        )
    if setting("cache_implementation") == "offloaded":
        return OFFLOADING_REFUSAL.format(press=press_name)
    if setting("cache_implementation") not in (None, "dynamic"):
        return (
            f"cache_implementation={setting('cache_implementation')!r} makes generate() use a cache that "
            f"{press_name} would leave uncompressed. {WHAT_TO_PASS}"
        )
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None and cache_refusal(kwargs[name], press_name) is not None:
            return cache_refusal(kwargs[name], press_name)
    if setting("use_cache") is False:
        return no_cache_refusal(press_name)
    return None


@contextmanager
def guarded_generate(model: nn.Module, press_name: str) -> Generator[None, None, None]:
    """For the block, `model.generate` first refuses what a press cannot serve (`generate_refusal`)."""
    if not hasattr(model, "generate"):
        yield
        return
    had_own = "generate" in vars(model)
    original = model.generate

    @wraps(original)
    def generate(*args, **kwargs):
        refusal = generate_refusal(model, press_name, kwargs)
        if refusal is not None:
            raise ValueError(refusal)
        return original(*args, **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        if had_own:
            model.generate = original
        else:
            del model.generate
