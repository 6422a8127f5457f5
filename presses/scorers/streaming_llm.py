"""StreamingLLMPress: Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PrefillContext
from ..scorer import ScorerPress


def first_available(available: torch.Tensor, count: int) -> torch.Tensor:
    """(batch, kv_heads, seq) bool: the first `count` available positions of each head. With left
    padding these are the first real tokens, not the pads."""
    return available & (available.long().cumsum(-1) <= count)


@dataclass
class StreamingLLMPress(ScorerPress):
    """Keeps the first `n_sink` real tokens (the attention sinks) and then the most recent tokens.

    score (batch, kv_heads, seq): the position index, plus seq_len for sink tokens, so sinks rank
    first and the rest by recency.
    """

    n_sink: int = 4

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be an integer >= 0, got {self.n_sink!r}.")

    def score(self, context: PrefillContext) -> torch.Tensor:
        return sink_and_recency_scores(context.available, self.n_sink)


def sink_and_recency_scores(available: torch.Tensor, n_sink: int) -> torch.Tensor:
    """(batch, kv_heads, seq) float32: the position index, plus seq for the first `n_sink` available tokens."""
    seq_len = available.shape[-1]
    recency = torch.arange(seq_len, device=available.device, dtype=torch.float32)
    return recency.expand(available.shape) + seq_len * first_available(available, n_sink).float()
