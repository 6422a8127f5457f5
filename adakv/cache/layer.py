"""The interface every compressed cache layer implements, whatever its backend.

A press's keep mask turns a dense `DynamicLayer` into a compressed layer (`make_compressed_layer`,
backends.py). The runtimes talk to compressed layers only through `CompressedLayer`: they never test for
a concrete class. Two implementations exist: `MaskedLayer` (masked.py, backend "mask": dense rows and a
per-head keep mask) and `FlatHeadwiseLayer` (flat.py, backend "evict": only the kept rows, per head).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from transformers.cache_utils import DynamicLayer

ADAKV_ATTENTION_PREFIX = "adakv_"  # attention functions that can read compressed layers are named "adakv_<base>"


def check_attention_can_read(config, backend: str) -> None:
    """Refuse to hand a compressed layer to an attention function that would ignore its per-head state.

    config: that of the model that compressed the layer; outside a press block it names the model's own
    attention again."""
    implementation = config._attn_implementation
    if not str(implementation).startswith(ADAKV_ATTENTION_PREFIX):
        raise RuntimeError(
            f"This cache holds layers compressed by an adakv press (backend {backend!r}), which only adakv's "
            "attention functions can read, but the model that compressed them is outside a press block now (it "
            f"runs its own attn_implementation={implementation!r} again), so they would be read as dense layers. "
            "Continue the cache inside a `with press(model):` block on the model that compressed it."
        )


class CompressedLayer(DynamicLayer):
    """A cache layer that holds a compressed context plus the tokens appended after it.

    backend: "mask" or "evict", which also says which view attention reads: "mask" layers keep the dense
    keys/values (`keys`, `values`) and hide pruned positions through `keep_mask(kv_length)`; "evict" layers
    hold per-head rows that `adakv.cache.flat_attention.flat_attention(query, layer, scaling)` reads.
    stores_padding_rows: False when the layer does not write the left padding of a padded append (the
    runtime then tells it which new tokens are padding, `skip_leading_tokens`).
    replays_decode_steps: True when a decode step's device state (lengths, buffers) lives on the device, so a
    captured decode step stays valid (CUDA graphs).
    """

    backend: ClassVar[str]
    stores_padding_rows: ClassVar[bool] = True
    replays_decode_steps: ClassVar[bool] = False

    @abstractmethod
    def kept_counts(self) -> torch.Tensor:
        """(batch, kv_heads) number of positions each head attends to."""

    @abstractmethod
    def newest_keys_values(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (batch, kv_heads, count, head_dim) of the last `count` tokens written."""

    @abstractmethod
    def fold_appended_into_context(self, keep: torch.Tensor) -> None:
        """Make every token appended after the context part of it, each head keeping `keep`
        (batch, kv_heads, appended) bool of them (one chunk of a chunked context prefill)."""

    @abstractmethod
    def held_view(self, available: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the layer holds now, to be scored again (compression during decoding): keys, values
        (batch, kv_heads, seq, head_dim) with the newest tokens last, and (batch, kv_heads, seq) bool of the
        positions that may be kept. available: (batch, kv_heads, dense length) real tokens, for layers whose
        view is the dense positions (None: every position is real)."""

    @abstractmethod
    def keep_only(self, keep: torch.Tensor, slack: int) -> None:
        """Keep only `keep` (the shape of `held_view`'s mask) of what the layer holds; every token so far becomes
        part of the compressed context. slack: free rows to leave per head for the tokens to come."""

    @abstractmethod
    def truncate(self, seq_len: int) -> None:
        """Drop every token after the first `seq_len` dense positions (never into the compressed context)."""

    def skip_leading_tokens(self, padding: torch.Tensor) -> None:
        """The next append's first `padding[b]` tokens of batch row b are padding (layers that store
        padding rows need not know)."""
