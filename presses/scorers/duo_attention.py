"""DuoAttentionPress: Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads", arXiv 2410.10819, with the head patterns estimated on the fly from the prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakv.selection import adaptive_keep_mask, kept_count

from ..base import PrefillContext
from ..fields import Integer
from ..scorer import ScorerPress
from .padding import relative_positions
from .snapkv import mean_window_attention
from .streaming_llm import first_available


def last_available(available: torch.Tensor, count: int) -> torch.Tensor:
    """(batch, kv_heads, seq) bool: the last `count` available positions of each head."""
    return available & (available.flip(-1).long().cumsum(-1).flip(-1) <= count)


def local_attention_share(context: PrefillContext, window: int, n_sink: int, n_recent: int) -> torch.Tensor:
    """(batch, kv_heads): the part of the attention of the last `window` queries (averaged over them and
    the query heads of each KV head) that falls on each head's first `n_sink` and last `n_recent`
    available tokens."""
    attention = mean_window_attention(context, min(window, context.seq_len))
    local = first_available(context.available, n_sink) | last_available(context.available, n_recent)
    return (attention * local).sum(-1)


def count_streaming_heads(local_share: torch.Tensor, available: torch.Tensor, budget: torch.Tensor, floor: int):
    """How many heads of each batch row must become streaming heads so the layer fits its budget.

    local_share: (batch, heads), the heads become streaming in decreasing order of it. available:
    (batch, heads, seq). budget: (batch,) tokens the layer may keep. A retrieval head keeps all its
    tokens, a streaming head `floor` (or all, if it has fewer). Returns (batch,) long: the fewest heads
    that fit, or every head when even that does not (the streaming heads then share the budget)."""
    tokens = available.sum(-1)  # (batch, heads)
    savings = (tokens - tokens.clamp(max=floor)).gather(-1, local_share.argsort(dim=-1, descending=True, stable=True))
    # cost[k] = tokens kept with the k most local heads streaming, k = 0 .. heads - 1
    cost = tokens.sum(-1, keepdim=True) - (savings.cumsum(-1) - savings)
    return (cost > budget[:, None]).sum(-1)


@dataclass
class DuoAttentionPress(ScorerPress):
    """Retrieval heads keep the whole context, streaming heads only the attention sinks and recent tokens.

    DuoAttention learns which heads are streaming heads with gates trained offline; this press needs
    no downloaded patterns and classifies each KV head of each layer from the prompt itself. Criterion:
    the *local share* of a head, the part of its observation-window attention (the last `window_size`
    queries, averaged over them and the query heads of the KV head) that falls on its first `n_sink`
    tokens and its last `n_recent` tokens. Restricting a head to those tokens changes its output by at
    most twice the attention it pays elsewhere (times the largest value norm), so the heads with the
    largest local share lose the least as streaming heads.

    Budget: `compression_ratio` is the knob. The layer keeps the same total as a uniform press at that
    ratio, and the fewest heads (most local first) turn streaming so the retrieval heads can keep
    everything; the streaming heads share the rest, each its sinks and then its most recent tokens (at
    least `n_recent`, more when the budget leaves room). Per-head lengths therefore differ, which both
    backends hold (keep masks are per head). At ratios where even every head streaming does not fit,
    every head is a streaming head (StreamingLLM with the layer's budget).

    score (batch, kv_heads, seq): 2 + s on retrieval heads, s on streaming heads, with s in [0, 1) the
    StreamingLLM order (sinks, then recency). The layer-wide top of these scores is this press's keep
    mask; a wrapper that keeps the same count in every head gets StreamingLLM's choice.
    """

    n_sink: int = 4
    n_recent: int = 64
    window_size: int = 64

    field_rules = {"n_sink": Integer(0), "n_recent": Integer(1), "window_size": Integer(1)}

    @property
    def hidden_states_rows(self) -> int:
        """The observation window's queries (`n_recent` counts keys, not queries)."""
        return self.window_size

    def local_share(self, context: PrefillContext) -> torch.Tensor:
        """(batch, kv_heads) share of the observation window's attention on sinks and recent tokens."""
        return local_attention_share(context, self.window_size, self.n_sink, self.n_recent)

    def streaming_heads(self, context: PrefillContext) -> torch.Tensor:
        """(batch, kv_heads) bool: the heads that keep only sinks and recent tokens at this layer's ratio."""
        available = context.available
        ratio = self.layer_compression_ratio(context)
        budget = kept_count(available.sum(-1), ratio).sum(-1)  # (batch,)
        share = self.local_share(context)
        count = count_streaming_heads(share, available, budget, self.n_sink + self.n_recent)
        order = torch.argsort(share, dim=-1, descending=True, stable=True).argsort(dim=-1)  # rank of each head
        return order < count[:, None]

    def score(self, context: PrefillContext) -> torch.Tensor:
        available = context.available
        position, length = relative_positions(available)  # from each row's first real token (left padding)
        sinks = first_available(available, self.n_sink)
        streaming_order = (position + length * sinks) / (2 * length)  # in [0, 1): sinks, then recency
        retrieval = ~self.streaming_heads(context)
        return streaming_order + 2.0 * retrieval[..., None]

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        ratio = self.layer_compression_ratio(context)
        if ratio == 0:
            return None
        return adaptive_keep_mask(self.score(context), context.available, ratio, alpha_safeguard=0.0)
