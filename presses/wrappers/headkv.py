"""HeadKVPress: Fu et al., "Not All Heads Matter: A Head-Level KV Cache Compression Method with Integrated
Retrieval and Reasoning", arXiv 2410.19258, with the head importance estimated from the prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakv.selection import adaptive_keep_mask, descending_rank, kept_count

from .adaptive import check_scoring_press
from ..base import PrefillContext, WrapperPress
from ..fields import FRACTION, Check, Integer
from ..scorers.duo_attention import local_attention_share


@dataclass
class HeadKVPress(WrapperPress):
    """Head-level budgets from head importance, then each head's top tokens by the inner scoring press.

    The layer keeps as many KV pairs as the inner press would (its `layer_compression_ratio`). Each head
    first gets `base_fraction` of the mean per-head budget; the rest of the layer's budget is pooled and
    shared between heads in proportion to their importance (D'Hondt apportionment: the pool's seats go
    to the largest quotients importance / 1, importance / 2, ... of every head, so shares are
    proportional and no head gets more than it has). Inside its budget every head keeps its best
    tokens by the inner press's scores (e.g. SnapKV, as in the paper).

    Importance: HeadKV scores heads offline by how they retrieve and reason over a needle; here it is
    estimated from the prompt itself, with no downloaded scores, as the share of the observation
    window's attention (the last `window_size` queries, averaged over them and the query heads of the
    KV head) that reaches the distant context: everything except the first `n_sink` tokens and the
    window itself. Heads that read far back get more budget, heads that look only at sinks and recent
    tokens less.

    compress -> keep mask (batch, kv_heads, seq) with per-head lengths that differ (both backends hold them).
    """

    base_fraction: float = 0.5
    window_size: int = 64
    n_sink: int = 4

    field_rules = {
        "press": Check(check_scoring_press),
        "base_fraction": FRACTION,
        "window_size": Integer(1),
        "n_sink": Integer(0),
    }

    @property
    def hidden_states_rows(self) -> int:
        """The observation window's queries (the inner press reads its own)."""
        return self.window_size

    def head_importance(self, context: PrefillContext) -> torch.Tensor:
        """(batch, kv_heads) in [0, 1]: the window's attention on the distant context, rounded to 1e-6 so
        that heads of equal importance (e.g. 0 when the window covers the whole context) tie exactly
        rather than by rounding noise."""
        local = local_attention_share(context, self.window_size, self.n_sink, self.window_size)
        return (1.0 - local).clamp(min=0).round(decimals=6)

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        ratio = self.press.layer_compression_ratio(context)
        if ratio == 0:
            return None
        available = context.available
        inner = self.press.score(context).float().masked_fill(~available, float("-inf"))
        rank = descending_rank(inner, dim=-1)  # (batch, kv_heads, seq), 0 = the head's best token
        layer_budget = kept_count(available.sum(-1), ratio).sum(-1)  # (batch,)
        # the floor adaptive_keep_mask guarantees every head: alpha * mean budget, computed as it does
        mean_budget = layer_budget.to(torch.float64) / available.shape[1]
        floor = torch.floor(self.base_fraction * mean_budget).long()[:, None, None]
        quotients = self.head_importance(context)[..., None] / (rank - floor + 1).clamp(min=1)
        allocation = torch.where(rank < floor, float("inf"), quotients)
        return adaptive_keep_mask(allocation, available, ratio, self.base_fraction)
