"""ChunkPress: compress the context chunk by chunk, so kept tokens are spread along the sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PrefillContext, WrapperPress
from ..fields import Check, Integer
from ..scorers.padding import keep_per_unpadded_row
from .composed import check_not_rerotation


@dataclass
class ChunkPress(WrapperPress):
    """Splits the context into chunks of `chunk_length` tokens and lets the inner press compress each
    one on its own, as if only that chunk had been prefilled (`context.slice`). Every chunk keeps its
    own share, so no part of a long context is dropped entirely. Chunks start at each row's first real
    token (a left-padded row is chunked as the row alone). Returns the concatenated keep masks
    (batch, kv_heads, seq).
    """

    chunk_length: int = 1024

    field_rules = {"press": Check(check_not_rerotation), "chunk_length": Integer(1)}
    hidden_states_rows = None  # its press reads the newest positions of every chunk

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        return keep_per_unpadded_row(context, self.unpadded_compress)

    def unpadded_compress(self, context: PrefillContext) -> torch.Tensor | None:
        masks, changed = [], False
        for start in range(0, context.seq_len, self.chunk_length):
            chunk = context.slice(start, min(start + self.chunk_length, context.seq_len))
            keep = self.press.compress(chunk)
            changed |= keep is not None
            masks.append(chunk.available if keep is None else keep)
        return torch.cat(masks, dim=-1) if changed else None
