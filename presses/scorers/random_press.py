"""RandomPress: a baseline that keeps a random subset of every head's tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PrefillContext
from ..scorer import ScorerPress


@dataclass
class RandomPress(ScorerPress):
    """Random scores (batch, kv_heads, seq), uniform in [0, 1).

    seed: None draws from a freshly seeded generator (different every call); an integer makes the
    selection reproducible (layer i uses seed + i, so layers still differ).
    """

    seed: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}.")

    def score(self, context: PrefillContext) -> torch.Tensor:
        generator = torch.Generator(device=context.keys.device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed + context.layer_idx)
        return torch.rand(context.available.shape, generator=generator, device=context.keys.device)
