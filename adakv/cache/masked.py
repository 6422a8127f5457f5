"""MaskedLayer (backend "mask"): the dense keys/values stay, a per-head keep mask hides pruned positions.

Saves no memory; works with any attention adakv's runtime wraps (sdpa, eager), any mask and model option.
Tokens appended later (question, answer) are kept by every head. A chunked context prefill appends each
context chunk the same way and then folds the chunk's kept tokens into the compressed context
(`fold_appended_into_context`), so the context grows chunk by chunk.
"""

from __future__ import annotations

import torch

from .layer import CompressedLayer, check_attention_can_read


class MaskedLayer(CompressedLayer):
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

    def held_view(self, available: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dense keys/values and the positions each head still attends (among `available`)."""
        keep = self.keep_mask(self.get_seq_length())
        return self.keys, self.values, keep if available is None else keep & available

    def keep_only(self, keep: torch.Tensor, slack: int) -> None:
        """`restrict_to(keep)`; a mask layer frees nothing, so `slack` does not apply."""
        self.restrict_to(keep)

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


