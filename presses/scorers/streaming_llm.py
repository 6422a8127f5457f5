"""StreamingLLMPress: Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
arXiv 2309.17453."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PrefillContext
from ..fields import Integer
from ..scorer import ScorerPress
from .padding import relative_positions


def first_available(available: torch.Tensor, count: int) -> torch.Tensor:
    """(batch, kv_heads, seq) bool: the first `count` available positions of each head. With left
    padding these are the first real tokens, not the pads."""
    return available & (available.long().cumsum(-1) <= count)


@dataclass
class StreamingLLMPress(ScorerPress):
    """Keeps the first `n_sink` real tokens (the attention sinks) and then the most recent tokens.

    score (batch, kv_heads, seq): the position index, plus seq_len for sink tokens, so sinks rank
    first and the rest by recency. Both count from the row's first real token (after left padding),
    so a padded row scores as the row alone.
    """

    n_sink: int = 4

    field_rules = {"n_sink": Integer(0)}
    reads_hidden_states = False  # positions only

    def score(self, context: PrefillContext) -> torch.Tensor:
        return sink_and_recency_scores(context.available, self.n_sink)


def sink_and_recency_scores(available: torch.Tensor, n_sink: int) -> torch.Tensor:
    """(batch, kv_heads, seq) float32: the position index, plus seq for the first `n_sink` available tokens;
    position and seq counted from each row's first real token (its left padding left out)."""
    recency, length = relative_positions(available)
    return recency.expand(available.shape) + length * first_available(available, n_sink).float()
