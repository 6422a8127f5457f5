"""PerLayerCompressionPress: a scoring press with a compression ratio chosen per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakv.selection import uniform_keep_mask

from .adaptive import check_scoring_press
from ..base import BasePress, PrefillContext, check_compression_ratio


@dataclass
class PerLayerCompressionPress(BasePress):
    """Scores with `press` but removes `compression_ratios[layer]` of each layer's tokens (uniformly
    per head). The list has one ratio per decoder layer, sliding-window layers (never compressed)
    included. Exposes `score` and `layer_compression_ratio`, so AdaptivePress can wrap it.
    """

    press: BasePress
    compression_ratios: list[float]

    def __post_init__(self):
        super().__post_init__()
        check_scoring_press(self.press, "PerLayerCompressionPress")
        if not isinstance(self.compression_ratios, (list, tuple)) or not self.compression_ratios:
            raise TypeError(
                f"compression_ratios must be a non-empty list of numbers in [0, 1), one per layer, "
                f"got {self.compression_ratios!r}."
            )
        for ratio in self.compression_ratios:
            check_compression_ratio(ratio)

    def inner_presses(self) -> tuple[BasePress, ...]:
        return (self.press,)

    @property
    def compression_ratio(self) -> float:
        """Mean of the per-layer ratios."""
        return sum(self.compression_ratios) / len(self.compression_ratios)

    @property
    def scores_are_probabilities(self) -> bool:
        return getattr(self.press, "scores_are_probabilities", False)

    @property
    def compresses_after_prefill(self) -> bool:
        return self.press.compresses_after_prefill

    def score(self, context: PrefillContext) -> torch.Tensor:
        return self.press.score(context)

    def layer_compression_ratio(self, context: PrefillContext) -> float:
        if len(self.compression_ratios) != context.num_layers:
            raise ValueError(
                f"PerLayerCompressionPress got {len(self.compression_ratios)} compression_ratios but the model "
                f"has {context.num_layers} layers; give exactly one ratio per layer."
            )
        return self.compression_ratios[context.layer_idx]

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        ratio = self.layer_compression_ratio(context)
        if ratio == 0:
            return None
        return uniform_keep_mask(self.score(context), context.available, ratio)
