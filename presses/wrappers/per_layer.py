"""PerLayerCompressionPress: a scoring press with a compression ratio chosen per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakv.selection import uniform_keep_mask

from .adaptive import check_scoring_press
from ..base import BasePress, PrefillContext
from ..fields import RATIO, Check, RealList


@dataclass
class PerLayerCompressionPress(BasePress):
    """Scores with `press` but removes `compression_ratios[layer]` of each layer's tokens (uniformly
    per head). The list has one ratio per decoder layer, sliding-window layers (never compressed)
    included. Exposes `score` and `layer_compression_ratio`, so AdaptivePress can wrap it.
    """

    press: BasePress
    compression_ratios: list[float]

    field_rules = {"press": Check(check_scoring_press), "compression_ratios": RealList(RATIO, "one per layer")}
    reads_hidden_states = False  # its press reads its own

    def inner_presses(self) -> tuple[BasePress, ...]:
        return (self.press,)

    @property
    def compression_ratio(self) -> float:
        """Mean of the per-layer ratios."""
        return sum(self.compression_ratios) / len(self.compression_ratios)

    @compression_ratio.setter
    def compression_ratio(self, value: float) -> None:
        raise AttributeError(
            "PerLayerCompressionPress has one ratio per layer and compression_ratio is their mean: set compression_ratios."
        )

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
