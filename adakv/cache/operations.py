"""Reading, rolling back and stacking a model's caches: kept counts, rollback, checkpoints, stacked caches."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from adakv.arguments import check_integer, given

from .layer import CompressedLayer


def check_cache(cache, owner: str) -> None:
    if not isinstance(cache, Cache):
        raise TypeError(
            f"{owner} takes a transformers Cache (e.g. the past_key_values of a forward or generate call, or a "
            f"DynamicCache()), got {given(cache)}."
        )


def newest_keys_values(layer: DynamicLayer, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (batch, kv_heads, count, head_dim) of the last `count` tokens written to `layer`,
    a dense DynamicLayer or a compressed one."""
    if isinstance(layer, CompressedLayer):
        return layer.newest_keys_values(count)
    return layer.keys[..., -count:, :], layer.values[..., -count:, :]


def compressed_layers(cache: Cache) -> dict[int, CompressedLayer]:
    """The layers of `cache` that a press compressed, by layer index."""
    return {index: layer for index, layer in enumerate(cache.layers) if isinstance(layer, CompressedLayer)}


def kept_token_counts(cache: Cache) -> dict[int, torch.Tensor]:
    """Number of tokens each head attends to, per compressed layer: {layer: (batch, kv_heads)}."""
    check_cache(cache, "kept_token_counts")
    return {index: layer.kept_counts() for index, layer in compressed_layers(cache).items()}


def rollback(cache: Cache, seq_len: int) -> None:
    """Drop every token after the first `seq_len` in every layer (e.g. a question and its answer).

    Raises ValueError when that would cut into a compressed context, or when a sliding-window layer
    has already dropped older tokens for newer ones (use `checkpoint` / `restore` around such use).
    seq_len: an integer >= 0 (a negative count would cut from the end, as a slice does: refused)."""
    check_cache(cache, "rollback")
    seq_len = check_integer("seq_len", seq_len, 0, "rollback")
    for index, layer in enumerate(cache.layers):
        if layer.get_seq_length() <= seq_len:
            continue
        if getattr(layer, "is_sliding", False):
            raise ValueError(
                f"Layer {index} is a sliding-window layer that has moved past {seq_len} tokens and cannot be "
                "rolled back; take `adakv.cache.checkpoint(cache)` before and `restore(cache, checkpoint)` after."
            )
        if isinstance(layer, CompressedLayer):
            layer.truncate(seq_len)
        else:
            layer.keys, layer.values = layer.keys[..., :seq_len, :], layer.values[..., :seq_len, :]


@dataclass
class Checkpoint:
    """What `restore` needs to bring a cache back: its length, and copies of its sliding-window layers
    (keys, values, cumulative_length), which drop their oldest tokens as new ones arrive."""

    seq_len: int
    sliding_layers: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)


def checkpoint(cache: Cache) -> Checkpoint:
    check_cache(cache, "checkpoint")
    sliding = {
        index: (layer.keys.clone(), layer.values.clone(), layer.cumulative_length)
        for index, layer in enumerate(cache.layers)
        if getattr(layer, "is_sliding", False) and getattr(layer, "keys", None) is not None
    }
    return Checkpoint(cache.get_seq_length(), sliding)


def restore(cache: Cache, saved: Checkpoint) -> None:
    """Bring `cache` back to `saved`: sliding-window layers are replaced by their copies, every other
    layer is rolled back to `saved.seq_len`."""
    check_cache(cache, "restore")
    if not isinstance(saved, Checkpoint):
        raise TypeError(f"restore: saved must be what adakv.cache.checkpoint(cache) returned, got {given(saved)}.")
    for index, (keys, values, cumulative_length) in saved.sliding_layers.items():
        layer = cache.layers[index]
        layer.keys, layer.values, layer.cumulative_length = keys, values, cumulative_length
    rollback(cache, saved.seq_len)


def stacking_refusal(cache: Cache) -> str | None:
    """Why `cache` cannot be one part of `stacked_cache` (None when it can): every layer must be a compressed layer
    that stacks (FlatHeadwiseLayer, backend "evict") with nothing appended after its context."""
    check_cache(cache, "stacking_refusal")
    for index, layer in enumerate(cache.layers):
        if not (isinstance(layer, CompressedLayer) and hasattr(type(layer), "stacked")):
            return f"layer {index} is a {type(layer).__name__}, not a compressed layer that stacks (backend 'evict')"
        if layer.get_seq_length() != layer.context_length:
            return f"layer {index} holds tokens appended after its context"
    return None


def stacked_cache(caches: list[Cache]) -> Cache:
    """One cache whose batch rows are the rows of `caches`, in order, layer by layer (`FlatHeadwiseLayer.stacked`):
    compressions of one context by different presses or ratios, answered in one batched decode. Each row keeps
    its own per-head lengths; the caches themselves are left unchanged. ValueError when a cache cannot be stacked
    (`stacking_refusal`) or the caches differ in their layers."""
    if not caches:
        raise ValueError("stacked_cache needs at least one cache.")
    for position, cache in enumerate(caches):
        refusal = stacking_refusal(cache)
        if refusal is not None:
            raise ValueError(f"Cache {position} cannot be stacked: {refusal}.")
    kinds = {tuple(type(layer) for layer in cache.layers) for cache in caches}
    if len(kinds) != 1:
        raise ValueError("The caches to stack must have the same layers (count and kind).")
    stack = copy.copy(caches[0])
    stack.layers = [type(parts[0]).stacked(list(parts)) for parts in zip(*(cache.layers for cache in caches))]
    return stack
