"""Cache layers that hold a compressed context, and helpers to inspect and roll back a cache.

A press replaces a layer of the model's `DynamicCache` after the context prefill:

- `MaskedLayer` (backend "mask") keeps the dense keys/values and a per-head keep mask over the
  context. Attention excludes pruned positions per head; no memory is freed.
- `FlatHeadwiseLayer` (backend "evict", adakv/flat/layer.py) gathers the kept rows of every head
  into one flat buffer per K and V; pruned rows are freed.

"evict" is the default: a press whose `backend` is not set (None) evicts. It gives the same results
as "mask", really frees memory (KV at ratio r is (1 - r) of dense plus < 2%) and decodes through
adakv's own CUDA/Triton kernels on GPU (benchmarks/results/). Where the evict backend
cannot serve the model (see `evict_refusal`, decided once at `with press(model):` from the model's
config), such a press falls back to "mask" with one `BackendFallbackWarning` naming the reason; an
explicit backend="evict" raises instead. "mask" stays available (backend="mask") for research on
masks: it needs nothing beyond the model's own attention and accepts any mask and model option.

Tokens appended later (question, answer) are kept by every head. A chunked context prefill
(adakv/chunked_prefill.py) appends each context chunk the same way and then folds the chunk's kept
tokens into the compressed context (`fold_appended_into_context`), so the context grows chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

ADAKV_ATTENTION_PREFIX = "adakv_"
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


def check_attention_can_read(config, backend: str) -> None:
    """Refuse to hand a compressed layer to an attention function that would ignore its per-head state."""
    implementation = config._attn_implementation
    if not str(implementation).startswith(ADAKV_ATTENTION_PREFIX):
        raise RuntimeError(
            f"This cache holds layers compressed by an adakv press (backend {backend!r}), which only adakv's "
            f"attention functions can read, but the model now runs attn_implementation={implementation!r}. "
            "Keep using the cache inside the `with press(model):` block that compressed it."
        )


class MaskedLayer(DynamicLayer):
    """Dense keys/values of shape (batch, kv_heads, seq, head_dim) plus `context_keep`, a bool mask
    (batch, kv_heads, context_len) of the context positions each head may still attend to."""

    backend = "mask"

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, context_keep: torch.Tensor, config):
        super().__init__()
        self.keys, self.values = keys, values
        self.device, self.dtype = keys.device, keys.dtype
        self.is_initialized = True
        self.context_keep = context_keep
        self.config = config

    @property
    def context_length(self) -> int:
        return self.context_keep.shape[-1]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        check_attention_can_read(self.config, self.backend)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def newest_keys_values(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (batch, kv_heads, count, head_dim) of the last `count` tokens (views)."""
        return self.keys[..., -count:, :], self.values[..., -count:, :]

    def fold_appended_into_context(self, keep: torch.Tensor) -> None:
        """Make every token after the compressed context part of it; `keep` (batch, kv_heads, appended)
        bool says which of them each head may still attend (a chunk of a chunked context prefill)."""
        appended = self.get_seq_length() - self.context_length
        expected = (*self.context_keep.shape[:2], appended)
        if tuple(keep.shape) != expected:
            raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {expected} (batch, kv_heads, appended).")
        self.context_keep = torch.cat([self.context_keep, keep.to(self.context_keep.device, torch.bool)], dim=-1)

    def restrict_to(self, keep: torch.Tensor) -> None:
        """Make every token so far (context and appended) part of the compressed context, each head keeping
        only `keep` (batch, kv_heads, seq_length) bool of the positions it attends now (compression during
        decoding, DecodingPress). Only attention is restricted: the dense keys and values stay, so a mask
        layer's memory keeps growing with the sequence (and the mask with it); backend "evict" frees the rows."""
        seq_length = self.get_seq_length()
        expected = (*self.context_keep.shape[:2], seq_length)
        if tuple(keep.shape) != expected:
            raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {expected} (batch, kv_heads, seq_length).")
        self.context_keep = self.keep_mask(seq_length) & keep.to(self.context_keep.device, torch.bool)

    def keep_mask(self, kv_length: int) -> torch.Tensor:
        """(batch, kv_heads, kv_length) bool: the context mask, then True for every later token."""
        appended = kv_length - self.context_length
        if appended < 0:
            raise ValueError(f"kv_length {kv_length} is shorter than the compressed context ({self.context_length}).")
        tail = self.context_keep.new_ones(*self.context_keep.shape[:2], appended)
        return torch.cat([self.context_keep, tail], dim=-1)

    def kept_counts(self) -> torch.Tensor:
        """(batch, kv_heads) number of positions each head attends to."""
        return self.context_keep.sum(-1) + (self.get_seq_length() - self.context_length)

    def truncate(self, seq_len: int) -> None:
        if seq_len < self.context_length:
            raise ValueError(
                f"Cannot roll back to {seq_len} tokens: the compressed context holds {self.context_length}."
            )
        self.keys, self.values = self.keys[..., :seq_len, :], self.values[..., :seq_len, :]

    def crop(self, length_or_tokens_to_remove: int) -> None:
        # transformers' convention changed between releases: a negative number removes that many
        # tokens, a non-negative one is the length to keep.
        length = length_or_tokens_to_remove
        if length < 0:
            length = self.get_seq_length() + length
        self.truncate(length)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.context_keep = self.context_keep[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.context_keep = self.context_keep.repeat_interleave(repeats, dim=0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.context_keep = self.context_keep.index_select(0, beam_idx.to(self.context_keep.device))


def make_compressed_layer(backend: str, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, config):
    """Build the cache layer for `backend` from the dense context keys/values (batch, kv_heads, seq,
    head_dim) and the keep mask (batch, kv_heads, seq)."""
    if backend == "mask":
        return MaskedLayer(keys, values, keep, config)
    if backend == "evict":
        from .flat.layer import FlatHeadwiseLayer  # imports this module

        return FlatHeadwiseLayer(keys, values, keep, config)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")


def newest_keys_values(layer: DynamicLayer, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (batch, kv_heads, count, head_dim) of the last `count` tokens written to `layer`,
    a dense DynamicLayer or a compressed one."""
    if hasattr(layer, "newest_keys_values"):
        return layer.newest_keys_values(count)
    return layer.keys[..., -count:, :], layer.values[..., -count:, :]


def compressed_layers(cache: Cache) -> dict[int, DynamicLayer]:
    """The layers of `cache` that a press compressed, by layer index."""
    return {index: layer for index, layer in enumerate(cache.layers) if hasattr(layer, "kept_counts")}


def kept_token_counts(cache: Cache) -> dict[int, torch.Tensor]:
    """Number of tokens each head attends to, per compressed layer: {layer: (batch, kv_heads)}."""
    return {index: layer.kept_counts() for index, layer in compressed_layers(cache).items()}


def rollback(cache: Cache, seq_len: int) -> None:
    """Drop every token after the first `seq_len` in every layer (e.g. a question and its answer).

    Raises ValueError when that would cut into a compressed context, or when a sliding-window layer
    has already dropped older tokens for newer ones (use `checkpoint` / `restore` around such use)."""
    for index, layer in enumerate(cache.layers):
        if layer.get_seq_length() <= seq_len:
            continue
        if getattr(layer, "is_sliding", False):
            raise ValueError(
                f"Layer {index} is a sliding-window layer that has moved past {seq_len} tokens and cannot be "
                "rolled back; take `adakv.cache.checkpoint(cache)` before and `restore(cache, checkpoint)` after."
            )
        if hasattr(layer, "truncate"):
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
    sliding = {
        index: (layer.keys.clone(), layer.values.clone(), layer.cumulative_length)
        for index, layer in enumerate(cache.layers)
        if getattr(layer, "is_sliding", False) and getattr(layer, "keys", None) is not None
    }
    return Checkpoint(cache.get_seq_length(), sliding)


def restore(cache: Cache, saved: Checkpoint) -> None:
    """Bring `cache` back to `saved`: sliding-window layers are replaced by their copies, every other
    layer is rolled back to `saved.seq_len`."""
    for index, (keys, values, cumulative_length) in saved.sliding_layers.items():
        layer = cache.layers[index]
        layer.keys, layer.values, layer.cumulative_length = keys, values, cumulative_length
    rollback(cache, saved.seq_len)
