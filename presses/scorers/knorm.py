"""KnormPress: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", arXiv 2406.11430."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PrefillContext
from ..scorer import ScorerPress


@dataclass
class KnormPress(ScorerPress):
    """Keeps the keys with the smallest L2 norm: the paper observes that low-norm keys draw high
    attention. score = -||k||, shape (batch, kv_heads, seq). Needs no queries or attention weights.
    """

    reads_hidden_states = False  # key norms only

    def score(self, context: PrefillContext) -> torch.Tensor:
        return -context.keys.float().norm(dim=-1)
