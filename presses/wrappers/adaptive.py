"""AdaptivePress: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation
for Efficient LLM Inference", arXiv 2407.11550."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakv.selection import EXCHANGES, Reduction, adaptive_keep_mask, model_keep_masks, reduction_for

from ..base import PrefillContext, WholePrefill, WrapperPress, check_is_press
from ..fields import FRACTION, Check, OneOf
from ..scorer import memoized_score

SCOPES = ("layer", "model")


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

    scope="layer" (the paper's): the layer keeps as many KV pairs as the inner press would (for
    PyramidKV: that layer's pyramid budget), but chooses them as the top scores over all its heads at
    once, so heads whose attention is concentrated lend budget to heads whose attention is spread.
    Each head is first guaranteed its best `alpha_safeguard * mean_budget` tokens.

    scope="model": the same over every (layer, KV head) of the model at once. The model keeps the sum
    over compressed layers of what the inner press would keep in each, but the budget flows across
    layers and heads by score; each (layer, head) is first guaranteed its best
    `alpha_safeguard * total / (layers * kv_heads)` tokens. Scores of different layers are ranked against
    each other, so the inner press's scores must be attention probabilities (`scores_are_probabilities`:
    SnapKV, PyramidKV, TOVA, ObservedAttention, KVzip; not Knorm, KeyDiff, Random, StreamingLLM, CriticalKV
    or ExpectedAttention with its value norm). It needs every layer's scores, so it compresses after the
    whole context prefill (BasePress.compresses_after_prefill): the dense cache of the whole context (and,
    of each layer's input hidden states, the newest rows the inner press reads, `layer_input_rows`: SnapKV's
    window, none for KVzip) is held until the prefill ends, then backend "evict" frees the pruned rows of
    every layer at once. A chunked prefill is refused.

    Under tensor parallelism (transformers' `tp_plan`, each rank holding some KV heads) the ranks
    exchange what the layer-wide top-k needs and select exactly the single-process set: the selection is
    the same, only its reduction (`reduction`, adakv.selection.reduction_for) differs; `exchange` picks it
    (adakv/selection/distributed.py): "all_gather" (every rank's scores) or "threshold_search" (a
    distributed search for the k-th largest score, a few small all-reduces). Unused on one process.
    With scope="model" the exchange runs once, over every layer's rows.

    keep masks: (batch, kv_heads, seq) per layer.
    """

    alpha_safeguard: float = 0.2
    scope: str = "layer"
    reads_hidden_states = False  # it ranks its inner press's scores (the inner press says what it reads)
    exchange: str = "all_gather"

    field_rules = {
        "press": Check(check_scoring_press),
        "alpha_safeguard": FRACTION,
        "scope": OneOf(SCOPES),
        "exchange": OneOf(EXCHANGES),
    }

    def check_combination(self) -> None:
        super().check_combination()
        if self.scope == "model" and not getattr(self.press, "scores_are_probabilities", False):
            raise ValueError(
                f'AdaptivePress(scope="model") ranks the scores of different layers against each other, which is '
                f"sound only for attention-probability scores; {type(self.press).__name__}'s are not "
                "(scores_are_probabilities is False: norms, similarities or random numbers differ in scale from "
                'layer to layer). Use an attention-based scorer (SnapKVPress, PyramidKVPress, TOVAPress, '
                'ObservedAttentionPress, KVzipPress) or scope="layer".'
            )

    @property
    def compresses_after_prefill(self) -> bool:
        return self.scope == "model" or self.press.compresses_after_prefill

    def reduction(self, context: PrefillContext) -> Reduction:
        """Where the layer's KV heads live: all in this process, or split over tensor-parallel ranks."""
        return reduction_for(context.module, context.keys.shape[1], self.exchange)

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        if self.scope == "model":
            raise RuntimeError(
                'AdaptivePress(scope="model") allocates over all layers at once; it compresses a whole prefill '
                "(compress_prefill), not one layer."
            )
        ratio = self.press.layer_compression_ratio(context)
        if ratio == 0:
            return None
        scores = memoized_score(self.press, context)
        return adaptive_keep_mask(scores, context.available, ratio, self.alpha_safeguard, self.reduction(context))

    def compress_prefill(self, prefill: WholePrefill) -> list[torch.Tensor | None]:
        if self.scope == "layer":
            return super().compress_prefill(prefill)
        keeps: list[torch.Tensor | None] = [None] * len(prefill.contexts)
        pooled = [
            (index, context, ratio)
            for index, context in enumerate(prefill.contexts)
            if (ratio := self.press.layer_compression_ratio(context)) > 0
        ]
        if not pooled:
            return keeps
        # every (layer, KV head) of the model is one row of the allocation
        masks = model_keep_masks(
            [memoized_score(self.press, context) for _, context, _ in pooled], [context.available for _, context, _ in pooled],
            [ratio for _, _, ratio in pooled], self.alpha_safeguard, self.reduction(pooled[0][1]),
        )  # fmt: skip
        for (index, _, _), keep in zip(pooled, masks):
            keeps[index] = keep
        return keeps
