"""TOVAPress: Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PrefillContext
from ..scorer import ScorerPress
from .snapkv import mean_window_attention


@dataclass
class TOVAPress(ScorerPress):
    """Token Omission Via Attention: keeps the keys the last context query attends to most.

    score (batch, kv_heads, seq): the softmax attention weights of the last query, averaged over the
    query heads that share each KV head.
    """

    scores_are_probabilities = True  # softmax attention weights
    hidden_states_rows = 1  # the last query only

    def score(self, context: PrefillContext) -> torch.Tensor:
        return mean_window_attention(context, window=1)
