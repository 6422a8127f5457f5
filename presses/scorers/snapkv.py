"""SnapKV: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from adakv.kernels.attention_scores import float32_scores

from ..base import PrefillContext
from ..fields import Integer
from ..scorer import ScorerPress


WINDOW_SCORES_BYTES = 1 << 28  # float32 logits computed at once; above it, slices of (batch, KV head) in turn


def mean_window_attention(context: PrefillContext, window: int) -> torch.Tensor:
    """Softmax attention of the last `window` context queries over all keys, averaged over those
    queries and over the query heads sharing each KV head: (batch, kv_heads, seq) float32.

    Unavailable keys get zero weight; a query that sees no available key (padding) adds nothing, and the
    mean is over the queries that see one, so a left-padded row gets what the row alone gets. The logits
    and probabilities (2 x groups x window x seq float32 per (batch, KV head): 2 GiB at 128k on the 8B
    shape) are computed for as many (batch, KV head) pairs at a time as fit WINDOW_SCORES_BYTES, each pair's
    by the same operations, so that a long prefill's peak does not hold them all."""
    seq_len = context.seq_len
    window_queries = context.last_queries(window)
    batch, num_heads, _, head_dim = window_queries.shape
    kv_heads = context.keys.shape[1]
    groups = num_heads // kv_heads
    # one matrix per (batch, kv-head): rows are its query heads x window positions
    grouped = window_queries.reshape(batch * kv_heads, groups * window, head_dim)
    keys = context.keys.reshape(batch * kv_heads, seq_len, head_dim).transpose(1, 2)
    available = context.available.reshape(batch * kv_heads, seq_len)

    sees_a_key = context.available.cumsum(-1)[..., seq_len - window :] > 0  # (batch, kv_heads, window)
    seeing = sees_a_key.sum(-1, keepdim=True).clamp(min=1)[:, :, None, :]  # (batch, kv_heads, 1, 1)
    row_weights = sees_a_key[:, :, None, :].expand(batch, kv_heads, groups, window).float() / (groups * seeing)
    row_weights = row_weights.reshape(batch * kv_heads, 1, groups * window)

    pairs = max(1, WINDOW_SCORES_BYTES // (groups * window * seq_len * 4))
    mean = torch.full((batch * kv_heads, 1, seq_len), float("nan"), device=grouped.device)  # NaN: a slice missed
    for start in range(0, batch * kv_heads, pairs):
        part = slice(start, start + pairs)
        mean[part] = _mean_probabilities(
            grouped[part], keys[part], available[part], row_weights[part], context.softmax_scale, window
        )
    return mean.view(batch, kv_heads, seq_len)


def _mean_probabilities(grouped, keys, available, row_weights, scale: float, window: int) -> torch.Tensor:
    """grouped (n, groups x window, head_dim), keys (n, head_dim, seq), available (n, seq), row_weights
    (n, 1, groups x window) -> (n, 1, seq): each row's softmax over the available keys it may see, weighted."""
    n, rows, seq_len = grouped.shape[0], grouped.shape[1], keys.shape[-1]
    logits = float32_scores(grouped, keys).mul_(scale).view(n, rows // window, window, seq_len)
    # masked in place with a finite minimum: exp gives exactly 0 and a fully hidden row no NaN
    lowest = torch.finfo(torch.float32).min
    logits.masked_fill_(~available[:, None, None, :], lowest)
    future = torch.ones(window, window, dtype=torch.bool, device=logits.device).triu(1)
    logits[..., seq_len - window :].masked_fill_(future, lowest)
    probabilities = logits.view(n, rows, seq_len).softmax(dim=-1)
    return torch.bmm(row_weights, probabilities)


def pool_available(scores: torch.Tensor, available: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Average pooling of width `kernel_size` (odd) along each head's sequence of *available* positions:
    position i gets the mean of its available neighbours, the kernel_size // 2 before and after it among the
    available ones (fewer at the ends). So positions no head may keep (left padding, tokens pruned earlier)
    never enter a mean, and a head's available tokens are pooled alike whether they sit in a dense view
    with gaps or compacted (DecodingPress's evict view): a left-padded row gets what the row alone gets.

    scores, available: (batch, kv_heads, seq) -> (batch, kv_heads, seq) float32, 0 where not available.
    With every position available this is `avg_pool1d(..., count_include_pad=False)`."""
    if kernel_size == 1:
        return scores.float().masked_fill(~available, 0.0)
    seq_len, half = scores.shape[-1], kernel_size // 2
    if bool(available.all()):  # nothing to compact (the same sums as below, without the sort)
        order, valid, compact = None, available.float(), scores.float()
    else:
        order = torch.argsort((~available).to(torch.int8), dim=-1, stable=True)  # available first, in order
        valid = available.gather(-1, order).float()
        compact = scores.float().gather(-1, order) * valid
    padded_scores = F.pad(compact, (half, half))
    padded_valid = F.pad(valid, (half, half))
    sums, counts = padded_scores[..., :seq_len].clone(), padded_valid[..., :seq_len].clone()
    for shift in range(1, kernel_size):  # one fixed order of additions, whatever the sequence length
        sums += padded_scores[..., shift : shift + seq_len]
        counts += padded_valid[..., shift : shift + seq_len]
    pooled = sums / counts.clamp(min=1) * valid
    return pooled if order is None else torch.zeros_like(pooled).scatter_(-1, order, pooled)


def window_bonus(available: torch.Tensor, window: int) -> torch.Tensor:
    """(batch, kv_heads, seq) float32: 2 + j / n on the available positions among the last `window` (the j-th
    of the n there, oldest first), 0 elsewhere. Attention weights are <= 1, so this puts the window above
    every other key, newest first; counted over available positions only, a left-padded row gets the
    values of the row alone."""
    in_window = available.clone()
    in_window[..., : available.shape[-1] - window] = False
    count = in_window.sum(-1, keepdim=True).clamp(min=1).float()
    rank = (in_window.long().cumsum(-1) - 1).float()
    return torch.where(in_window, 2.0 + rank / count, 0.0)


@dataclass
class SnapKVPress(ScorerPress):
    """Scores each key by the attention it receives from the last `window_size` queries of the
    context (averaged over those queries and over the query heads sharing the KV head), smoothed
    by average pooling of width `kernel_size` over each head's available positions (`pool_available`:
    padding and pruned positions never enter a mean). The window itself is always kept first.
    """

    scores_are_probabilities = True  # pooled softmax weights; the window bonus is the same in every layer

    window_size: int = 64
    kernel_size: int = 5

    field_rules = {"window_size": Integer(1), "kernel_size": Integer(1, odd=True)}

    @property
    def hidden_states_rows(self) -> int:
        """Only the window's queries are computed."""
        return self.window_size

    def score(self, context: PrefillContext) -> torch.Tensor:
        seq_len = context.seq_len
        window = min(self.window_size, seq_len)
        weights = mean_window_attention(context, window)  # (batch, kv_heads, seq)
        pooled = pool_available(weights, context.available, self.kernel_size)
        pooled[..., seq_len - window :] = window_bonus(context.available, window)[..., seq_len - window :]
        return pooled
