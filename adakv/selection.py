"""Turning scores into per-head keep masks.

Scores have shape (batch, kv_heads, seq); higher means keep. `available` (same shape, bool) marks the
positions that may be kept at all: real (non-padding) tokens not pruned by an earlier press. Both
selections return a bool keep mask of that shape, always a subset of `available`.
"""

from __future__ import annotations

import torch


def descending_rank(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Rank of each element along `dim` when sorted by descending score (0 = best)."""
    order = scores.argsort(dim=dim, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(dim, order, torch.arange(scores.shape[dim], device=scores.device).expand_as(order))
    return ranks


def kept_count(num_available: torch.Tensor, compression_ratio: float) -> torch.Tensor:
    """How many of `num_available` tokens survive `compression_ratio` (at least one, if any exist)."""
    kept = torch.round(num_available.to(torch.float64) * (1.0 - compression_ratio)).long()
    return torch.minimum(kept.clamp(min=1), num_available.long())


def uniform_keep_mask(scores: torch.Tensor, available: torch.Tensor, compression_ratio: float) -> torch.Tensor:
    """Every (batch, head) keeps its own best `(1 - ratio) * available` tokens."""
    masked = scores.float().masked_fill(~available, float("-inf"))
    budget = kept_count(available.sum(-1), compression_ratio)  # (batch, kv_heads)
    return (descending_rank(masked, dim=-1) < budget.unsqueeze(-1)) & available


def adaptive_keep_mask(
    scores: torch.Tensor, available: torch.Tensor, compression_ratio: float, alpha_safeguard: float
) -> torch.Tensor:
    """Ada-KV allocation: the layer keeps the same total as a uniform selection would, but the
    budget flows between heads. Each head is first guaranteed its best `alpha * mean_budget` tokens
    (the safeguard); the rest of the layer's budget goes to the best remaining scores of all heads.
    """
    layer_budget = kept_count(available.sum(-1), compression_ratio).sum(-1)  # (batch,)
    return pooled_keep_mask(scores, available, layer_budget, alpha_safeguard)


def pooled_keep_mask(
    scores: torch.Tensor, available: torch.Tensor, total_budget: torch.Tensor, alpha_safeguard: float
) -> torch.Tensor:
    """Keep the best `total_budget[b]` (batch,) scores over all rows ("heads") of each batch row at
    once, each row first guaranteed its best `floor(alpha * total_budget / rows)` tokens.

    Rows are a layer's KV heads (Ada-KV) or every (layer, KV head) of the model (model-wide allocation)."""
    batch, heads, seq_len = scores.shape
    masked = scores.float().masked_fill(~available, float("-inf"))
    mean_budget = total_budget.to(torch.float64) / heads
    floor = torch.floor(alpha_safeguard * mean_budget).long().unsqueeze(-1)  # (batch, 1)
    floor = torch.minimum(floor, available.sum(-1))  # a head cannot keep more than it has
    guaranteed = (descending_rank(masked, dim=-1) < floor.unsqueeze(-1)) & available

    # Guaranteed tokens rank first over all rows, then everything else by score.
    boosted = masked.masked_fill(guaranteed, float("inf")).reshape(batch, heads * seq_len)
    pooled_rank = descending_rank(boosted, dim=-1).reshape(batch, heads, seq_len)
    return (pooled_rank < total_budget.view(batch, 1, 1)) & available
