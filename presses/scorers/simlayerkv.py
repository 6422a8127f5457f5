"""SimLayerKVPress: Zhang et al., "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction",
arXiv 2410.13846."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakv.selection import uniform_keep_mask

from ..base import PrefillContext
from ..fields import FRACTION, Integer
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
    tokens in all) is at least `lazy_threshold`. Such a layer hardly looks past its sinks and its recent
    window, so dropping the rest changes little. A lazy layer keeps exactly those tokens; every other layer
    keeps everything (layer_compression_ratio 0).

    Batches: the decision is taken per batch row, so a row (left-padded or not) is compressed as the row
    alone. A press around this one (AdaptivePress, CriticalKVPress, ...) takes one ratio per layer for the
    whole batch (`layer_compression_ratio`), which raises a ValueError at a layer where the rows disagree.

    The paper keeps a fixed window (4 sinks, 1024 recent tokens) and tunes the threshold per model; here
    the window is the `(1 - compression_ratio)` budget, so ratio sweeps compare at equal lazy-layer
    budgets. `lazy_threshold=0` makes every layer lazy without measuring (StreamingLLM everywhere).

    score: (batch, kv_heads, seq) float32, StreamingLLM's (sinks first, then by recency).
    """

    compression_ratio: float = 0.5
    lazy_threshold: float = 0.9
    n_last: int = 32
    n_sink: int = 4

    field_rules = {"lazy_threshold": FRACTION, "n_last": Integer(1), "n_sink": Integer(0)}

    @property
    def hidden_states_rows(self) -> int:
        """The `n_last` queries of the lazy criterion."""
        return self.n_last

    def score(self, context: PrefillContext) -> torch.Tensor:
        return sink_and_recency_scores(context.available, self.n_sink)

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        if self.compression_ratio == 0:
            return None
        lazy = None if self.lazy_threshold == 0 else self.lazy_rows(context)  # None: every row lazy
        if lazy is not None and not bool(lazy.any()):
            return None
        keep = uniform_keep_mask(self.score(context), context.available, self.compression_ratio)
        if lazy is None or bool(lazy.all()):
            return keep
        return torch.where(lazy[:, None, None], keep, context.available)  # the rows that are not lazy keep all

    def lazy_rows(self, context: PrefillContext) -> torch.Tensor:
        """(batch,) bool: the rows for which this layer is lazy."""
        return self.lazy_attention_share(context) >= self.lazy_threshold

    def lazy_attention_share(self, context: PrefillContext) -> torch.Tensor:
        """(batch,) share of the last `n_last` queries' attention on the sinks and recent window."""
        weights = mean_window_attention(context, min(self.n_last, context.seq_len))  # (batch, kv_heads, seq)
        window = uniform_keep_mask(self.score(context), context.available, self.compression_ratio)
        return (weights * window).sum(-1).mean(-1)

    def is_lazy(self, context: PrefillContext) -> bool:
        """Whether the layer is lazy for the whole batch; ValueError when its rows disagree."""
        if self.lazy_threshold == 0:
            return True
        lazy = self.lazy_rows(context)
        if bool(lazy.all()) or not bool(lazy.any()):
            return bool(lazy.all())
        raise ValueError(
            f"SimLayerKVPress finds layer {context.layer_idx} lazy for {int(lazy.sum())} of the {lazy.numel()} "
            "batch rows. A press around it (or any caller of layer_compression_ratio) takes one ratio for the "
            "whole batch, which would compress some rows differently from the same row alone. Use "
            "SimLayerKVPress unwrapped (it decides per row), or run these rows one by one."
        )

    def layer_compression_ratio(self, context: PrefillContext) -> float:
        if self.compression_ratio == 0 or not self.is_lazy(context):
            return 0.0
        return self.compression_ratio
