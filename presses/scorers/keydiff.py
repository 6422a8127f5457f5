"""KeyDiffPress: Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context
LLM Inference in Resource-Constrained Environments", arXiv 2504.15364."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..base import PrefillContext
from ..scorer import ScorerPress


@dataclass
class KeyDiffPress(ScorerPress):
    """Keeps the most distinctive keys: score = -cos(k, anchor), where the anchor is the mean of the
    head's normalised available keys. Shape (batch, kv_heads, seq). Needs no queries.
    """

    reads_hidden_states = False  # keys only

    def score(self, context: PrefillContext) -> torch.Tensor:
        unit_keys = F.normalize(context.keys.float(), dim=-1)  # (batch, kv_heads, seq, head_dim)
        weights = context.available.float().unsqueeze(-1)
        anchor = (unit_keys * weights).sum(dim=2) / weights.sum(dim=2).clamp(min=1)  # (batch, kv_heads, head_dim)
        return -torch.einsum("bhsd,bhd->bhs", unit_keys, F.normalize(anchor, dim=-1))
