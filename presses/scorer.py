"""ScorerPress: presses that score every cached (token, KV head) pair and keep the best ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from adakv.selection import uniform_keep_mask

from .base import BasePress, PrefillContext
from .fields import RATIO


@dataclass
class ScorerPress(BasePress):
    """Scores each (token, KV head) pair; every head keeps its best `(1 - compression_ratio)` share.

    compression_ratio: fraction of the context's KV pairs removed, in [0, 1).
    Subclasses implement `score(context) -> (batch, kv_heads, seq)`, higher = keep.
    """

    compression_ratio: float = 0.0
    # True when scores are attention probabilities (in [0, 1], the same scale in every layer), so that
    # AdaptivePress(scope="model") may rank the scores of different layers against each other.
    scores_are_probabilities: ClassVar[bool] = False

    field_rules = {"compression_ratio": RATIO}

    def score(self, context: PrefillContext) -> torch.Tensor:
        raise NotImplementedError

    def layer_compression_ratio(self, context: PrefillContext) -> float:
        """Ratio applied to this layer; presses with per-layer budgets (PyramidKV) override it."""
        return self.compression_ratio

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        return uniform_compress(self, context)


def uniform_compress(press, context: PrefillContext) -> torch.Tensor | None:
    """Keep mask of a press exposing `score` and `layer_compression_ratio`: per-head top-k."""
    ratio = press.layer_compression_ratio(context)
    if ratio == 0:
        return None
    return uniform_keep_mask(press.score(context), context.available, ratio)
