"""RandomPress: a baseline that keeps a random subset of every head's tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PrefillContext
from ..fields import Integer
from ..scorer import ScorerPress
from .padding import scores_per_unpadded_row


@dataclass
class RandomPress(ScorerPress):
    """Random scores (batch, kv_heads, seq), uniform in [0, 1).

    seed: None draws from a freshly seeded generator (different every call); an integer makes the
    selection reproducible (layer i uses seed + i, so layers still differ). With a seed, every batch row
    draws its own numbers from that seed over its real tokens (after its left padding), so a row of a
    batch, padded or not, gets what the row alone gets.
    """

    seed: int | None = None

    field_rules = {"seed": Integer(0, optional=True)}
    reads_hidden_states = False  # random numbers only

    @property
    def scores_memoizable(self) -> bool:
        """Without a seed every call draws new numbers, so no memo may stand in for a call."""
        return self.seed is not None

    def score(self, context: PrefillContext) -> torch.Tensor:
        generator = torch.Generator(device=context.keys.device)
        if self.seed is None:
            generator.seed()
            return torch.rand(context.available.shape, generator=generator, device=context.keys.device)

        def draw(row: PrefillContext) -> torch.Tensor:
            generator.manual_seed(self.seed + context.layer_idx)
            return torch.rand(row.available.shape, generator=generator, device=context.keys.device)

        return scores_per_unpadded_row(context, draw, always=True)
