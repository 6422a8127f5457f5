"""SnapKV: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from adakv.kernels.attention_scores import float32_scores
from adakv.models import queries

from ..base import PrefillContext
from ..scorer import ScorerPress


def mean_window_attention(context: PrefillContext, window: int) -> torch.Tensor:
    """Softmax attention of the last `window` context queries over all keys, averaged over those
    queries and over the query heads sharing each KV head: (batch, kv_heads, seq) float32.

    Unavailable keys get zero weight; a query that sees no available key (padding) adds nothing."""
    module, seq_len = context.module, context.seq_len
    cos, sin = context.position_embeddings
    window_queries = queries(module, context.hidden_states[:, -window:], (cos[:, -window:], sin[:, -window:]))
    batch, num_heads, _, head_dim = window_queries.shape
    kv_heads = context.keys.shape[1]
    groups = num_heads // kv_heads
    # one matrix per (batch, kv-head): rows are its query heads x window positions
    grouped = window_queries.reshape(batch * kv_heads, groups * window, head_dim)
    keys = context.keys.reshape(batch * kv_heads, seq_len, head_dim).transpose(1, 2)
    logits = float32_scores(grouped, keys).mul_(module.scaling).view(batch, kv_heads, groups, window, seq_len)

    # masked in place with a finite minimum: exp gives exactly 0 and a fully hidden row no NaN
    lowest = torch.finfo(torch.float32).min
    logits.masked_fill_(~context.available[:, :, None, None, :], lowest)
    future = torch.ones(window, window, dtype=torch.bool, device=logits.device).triu(1)
    logits[..., seq_len - window :].masked_fill_(future, lowest)
    probabilities = logits.view(batch * kv_heads, groups * window, seq_len).softmax(dim=-1)

    sees_a_key = context.available.cumsum(-1)[..., seq_len - window :] > 0  # (batch, kv_heads, window)
    row_weights = sees_a_key[:, :, None, :].expand(batch, kv_heads, groups, window).float() / (groups * window)
    mean = torch.bmm(row_weights.reshape(batch * kv_heads, 1, groups * window), probabilities)
    return mean.view(batch, kv_heads, seq_len)


@dataclass
class SnapKVPress(ScorerPress):
    """Scores each key by the attention it receives from the last `window_size` queries of the
    context (averaged over those queries and over the query heads sharing the KV head), smoothed
    by average pooling of width `kernel_size`. The window itself is always kept first.
    """

    scores_are_probabilities = True  # pooled softmax weights; the window bonus is the same in every layer

    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self):
        super().__post_init__()
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError("window_size must be >= 1 and kernel_size a positive odd number.")

    def score(self, context: PrefillContext) -> torch.Tensor:
        seq_len = context.seq_len
        window = min(self.window_size, seq_len)
        weights = mean_window_attention(context, window)  # (batch, kv_heads, seq)
        batch, kv_heads, _ = weights.shape
        pooled = F.avg_pool1d(
            weights.reshape(batch * kv_heads, 1, seq_len),
            kernel_size=self.kernel_size,
            stride=1,
            padding=self.kernel_size // 2,
            count_include_pad=False,
        ).view(batch, kv_heads, seq_len)
        # Attention weights are <= 1, so 2 + rank puts the window above every other key, newest first.
        window_bonus = 2.0 + torch.arange(window, device=pooled.device) / window
        pooled[..., seq_len - window :] = window_bonus
        return pooled
