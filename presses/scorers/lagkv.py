"""LagKVPress: Liang et al., "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are
Important", arXiv 2504.04704."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PrefillContext
from ..fields import Integer
from ..scorer import ScorerPress
from .padding import scores_per_unpadded_row
from .streaming_llm import first_available

_SINK_SCORE = 4.0  # above the recent window (2 + recency < 3) and every partition score (<= 2)
_RECENT_SCORE = 2.0


def lag_relative_spread(states: torch.Tensor, reference: torch.Tensor, reference_available: torch.Tensor) -> torch.Tensor:
    """Std over channels of each token's state min/max-normalised by the next partition, softmaxed over the partition.

    states: (batch, kv_heads, partitions, lag, head_dim); reference: the same, shifted by one partition,
    with reference_available (batch, kv_heads, partitions, lag) bool -> (batch, kv_heads, partitions, lag)."""
    hidden = ~reference_available[..., None]
    low = reference.masked_fill(hidden, float("inf")).amin(dim=-2, keepdim=True)
    high = reference.masked_fill(hidden, float("-inf")).amax(dim=-2, keepdim=True)
    empty = ~reference_available.any(-1)[..., None, None]  # a reference of padding only: no normalisation
    low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 1.0)
    normalised = (states - low) / (high - low).clamp(min=1e-6)
    return normalised.std(dim=-1).softmax(dim=-1)


@dataclass
class LagKVPress(ScorerPress):
    """Attention-free scores from the keys and values alone (no queries, no attention weights).

    After the first `n_sink` tokens, the context is cut into partitions of `lag_size` tokens. The tokens of
    partition p are judged against the next one, p + 1 (the "lag"): keys and values of partition p are
    min/max-normalised per channel with the min and max over the tokens of partition p + 1, and a token's
    score is softmax over the partition of the std over channels of its normalised key, plus the same for
    its value. A token that stands out from what follows it scores high. The last whole partition (it has
    no next one) and the leftover tokens after it form the recent window, always ranked first after the
    sinks, newest first; the sinks (first `n_sink` real tokens) rank above everything.

    score: (batch, kv_heads, seq) float32; partition scores in (0, 2], recent window in [2, 3), sinks 4+.
    Selection is the usual per-head top-k over the whole context (the paper picks a top-k inside each
    partition; the softmax makes every partition's scores sum to 2, so shares stay comparable).
    """

    n_sink: int = 4
    lag_size: int = 128

    field_rules = {"n_sink": Integer(0), "lag_size": Integer(1)}
    reads_hidden_states = False  # keys and values only

    def score(self, context: PrefillContext) -> torch.Tensor:
        """Sinks and partitions count from each row's first real token: a left-padded row is scored on its
        unpadded context, as the row alone."""
        return scores_per_unpadded_row(context, self.unpadded_score)

    def unpadded_score(self, context: PrefillContext) -> torch.Tensor:
        available = context.available
        batch, kv_heads, seq_len = available.shape
        scores = torch.zeros(batch, kv_heads, seq_len, device=available.device)
        partitions = max((seq_len - self.n_sink) // self.lag_size - 1, 0)  # those with a next partition
        end = min(self.n_sink + partitions * self.lag_size, seq_len)  # where the recent window starts
        if partitions > 0:
            scores[..., self.n_sink : end] = self.partition_scores(context, partitions)
        recent = torch.arange(seq_len - end, device=available.device, dtype=torch.float32)
        scores[..., end:] = _RECENT_SCORE + recent / max(seq_len - end, 1)
        return scores + _SINK_SCORE * first_available(available, self.n_sink).float()

    def partition_scores(self, context: PrefillContext, partitions: int) -> torch.Tensor:
        """(batch, kv_heads, partitions * lag_size) scores of the partitioned tokens after the sinks."""
        start, lag = self.n_sink, self.lag_size
        span = slice(start, start + (partitions + 1) * lag)  # the scored partitions and the last one, their reference
        batch, kv_heads = context.available.shape[:2]
        available = context.available[..., span].view(batch, kv_heads, partitions + 1, lag)
        total = 0.0
        for states in (context.keys, context.values):
            blocks = states[..., span, :].float().view(batch, kv_heads, partitions + 1, lag, -1)
            total = total + lag_relative_spread(blocks[:, :, :-1], blocks[:, :, 1:], available[:, :, 1:])
        return total.reshape(batch, kv_heads, partitions * lag)
