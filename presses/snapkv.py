"""SnapKV: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adakv.models import queries

from .base import PrefillContext
from .scorer import ScorerPress


def window_attention(context: PrefillContext, window: int) -> torch.Tensor:
    """Softmax attention of the last `window` context queries over all keys.

    Returns (batch, kv_heads, groups, window, seq) float32; unavailable keys get zero weight."""
    module, seq_len = context.module, context.seq_len
    cos, sin = context.position_embeddings
    window_queries = queries(module, context.hidden_states[:, -window:], (cos[:, -window:], sin[:, -window:]))
    batch, num_heads, _, head_dim = window_queries.shape
    kv_heads = context.keys.shape[1]
    grouped = window_queries.view(batch, kv_heads, num_heads // kv_heads, window, head_dim)
    logits = torch.einsum("bhgwd,bhsd->bhgws", grouped.float(), context.keys.float()) * module.scaling

    query_positions = torch.arange(seq_len - window, seq_len, device=logits.device)
    causal = query_positions[:, None] >= torch.arange(seq_len, device=logits.device)[None, :]
    allowed = causal[None, None, None] & context.available[:, :, None, None, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)


@dataclass
class SnapKVPress(ScorerPress):
    """Scores each key by the attention it receives from the last `window_size` queries of the
    context (averaged over those queries and over the query heads sharing the KV head), smoothed
    by average pooling of width `kernel_size`. The window itself is always kept first.
    """

    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self):
        super().__post_init__()
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError("window_size must be >= 1 and kernel_size a positive odd number.")

    def score(self, context: PrefillContext) -> torch.Tensor:
        seq_len = context.seq_len
        window = min(self.window_size, seq_len)
        weights = window_attention(context, window).mean(dim=(2, 3))  # (batch, kv_heads, seq)
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
