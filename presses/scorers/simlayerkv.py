"""SimLayerKVPress: Zhang et al., "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction",
arXiv 2410.13846."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakv.selection import uniform_keep_mask

from ..base import PrefillContext, check_fraction_fields, check_integer_fields
from ..scorer import ScorerPress
from .snapkv import mean_window_attention
from .streaming_llm import sink_and_recency_scores


@dataclass
class SimLayerKVPress(ScorerPress):
    """Compresses only "lazy" layers, and there keeps just the attention sinks and the most recent tokens.

    Lazy criterion: take the last `n_last` queries of the prompt, their softmax attention over the
    context averaged over those queries and over the layer's query heads (SnapKV's window attention,
    `mean_window_attention`). The layer is lazy when the share of that attention falling on what
    StreamingLLM would keep (the first `n_sink` real tokens and the most recent ones, `(1 - ratio)` of the
    tokens in all) is at least `lazy_threshold`, averaged over the batch. Such a layer hardly looks past its
    sinks and its recent window, so dropping the rest changes little. A lazy layer keeps exactly those
    tokens; every other layer keeps everything (layer_compression_ratio 0).

    The paper keeps a fixed window (4 sinks, 1024 recent tokens) and tunes the threshold per model; here
    the window is the `(1 - compression_ratio)` budget, so ratio sweeps compare at equal lazy-layer
    budgets. `lazy_threshold=0` makes every layer lazy without measuring (StreamingLLM everywhere).

    score: (batch, kv_heads, seq) float32, StreamingLLM's (sinks first, then by recency).
    """

    compression_ratio: float = 0.5
    lazy_threshold: float = 0.9
    n_last: int = 32
    n_sink: int = 4

    def __post_init__(self):
        super().__post_init__()
        check_fraction_fields(self, ("lazy_threshold",))
        check_integer_fields(self, {"n_last": 1, "n_sink": 0})

    def score(self, context: PrefillContext) -> torch.Tensor:
        return sink_and_recency_scores(context.available, self.n_sink)

    def lazy_attention_share(self, context: PrefillContext) -> torch.Tensor:
        """(batch,) share of the last `n_last` queries' attention on the sinks and recent window."""
        weights = mean_window_attention(context, min(self.n_last, context.seq_len))  # (batch, kv_heads, seq)
        window = uniform_keep_mask(self.score(context), context.available, self.compression_ratio)
        return (weights * window).sum(-1).mean(-1)

    def is_lazy(self, context: PrefillContext) -> bool:
        if self.lazy_threshold == 0:
            return True
        return self.lazy_attention_share(context).mean().item() >= self.lazy_threshold

    def layer_compression_ratio(self, context: PrefillContext) -> float:
        if self.compression_ratio == 0 or not self.is_lazy(context):
            return 0.0
        return self.compression_ratio
