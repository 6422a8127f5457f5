"""AdaptivePress: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation
for Efficient LLM Inference", arXiv 2407.11550."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakv.distributed import check_exchange, distributed_adaptive_keep_mask, tensor_parallel_group
from adakv.selection import adaptive_keep_mask

from .base import PrefillContext, WrapperPress, check_is_press


def check_scoring_press(press, wrapper: str) -> None:
    """Wrappers that reallocate budgets need a press that exposes `score` and `layer_compression_ratio`."""
    check_is_press(press, wrapper)
    if not (hasattr(press, "score") and hasattr(press, "layer_compression_ratio")):
        raise TypeError(
            f"{wrapper} needs a scoring press (a ScorerPress such as SnapKVPress, or a PerLayerCompressionPress "
            f"around one), got {type(press).__name__}."
        )


@dataclass
class AdaptivePress(WrapperPress):
    """Ada-KV's head-wise budget allocation around any scoring press.

    The layer keeps as many KV pairs as the inner press would (for PyramidKV: that layer's pyramid
    budget), but chooses them as the top scores over all its heads at once, so heads whose
    attention is concentrated lend budget to heads whose attention is spread. Each head is first
    guaranteed its best `alpha_safeguard * mean_budget` tokens.

    Under tensor parallelism (transformers' `tp_plan`, each rank holding some KV heads) the ranks
    exchange what the layer-wide top-k needs and select exactly the single-process set; `exchange`
    picks how (adakv/distributed.py): "all_gather" (every rank's scores) or "threshold_search" (a
    distributed search for the k-th largest score, a few small all-reduces). Unused on one process.
    """

    alpha_safeguard: float = 0.2
    exchange: str = "all_gather"

    def __post_init__(self):
        super().__post_init__()
        check_scoring_press(self.press, "AdaptivePress")
        if not isinstance(self.alpha_safeguard, (int, float)) or not 0.0 <= self.alpha_safeguard <= 1.0:
            raise ValueError(f"alpha_safeguard must be a number in [0, 1], got {self.alpha_safeguard!r}.")
        check_exchange(self.exchange)

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        ratio = self.press.layer_compression_ratio(context)
        if ratio == 0:
            return None
        scores = self.press.score(context)
        group = tensor_parallel_group(context.module, context.keys.shape[1])
        if group is None:
            return adaptive_keep_mask(scores, context.available, ratio, self.alpha_safeguard)
        return distributed_adaptive_keep_mask(
            scores, context.available, ratio, self.alpha_safeguard, group, self.exchange
        )
