"""Single-process selections: scores -> per-head keep masks.

Scores have shape (batch, kv_heads, seq); higher means keep. `available` (same shape, bool) marks the
positions that may be kept at all: real (non-padding) tokens not pruned by an earlier press. Both
selections return a bool keep mask of that shape, always a subset of `available`.
"""

from __future__ import annotations

import torch


def descending_rank(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Rank of each element along `dim` when sorted by descending score (0 = best)."""
    return ranks_of_order(scores.argsort(dim=dim, descending=True, stable=True), dim)


def ranks_of_order(order: torch.Tensor, dim: int) -> torch.Tensor:
    """Invert a permutation along `dim`: order[..., r] = i (i ranks r-th) -> ranks[..., i] = r."""
    ranks = torch.empty_like(order)
    ranks.scatter_(dim, order, torch.arange(order.shape[dim], device=order.device).expand_as(order))
    return ranks


def kept_count(num_available: torch.Tensor, compression_ratio: float) -> torch.Tensor:
    """How many of `num_available` tokens survive `compression_ratio` (at least one, if any exist)."""
    kept = torch.round(num_available.to(torch.float64) * (1.0 - compression_ratio)).long()
    return torch.minimum(kept.clamp(min=1), num_available.long())


def top_k_keep_mask(scores: torch.Tensor, available: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Every (batch, head) keeps its own best `budget[batch, head]` available tokens (ties: earlier first)."""
    masked = scores.float().masked_fill(~available, float("-inf"))
    return (descending_rank(masked, dim=-1) < budget.unsqueeze(-1)) & available


def uniform_keep_mask(scores: torch.Tensor, available: torch.Tensor, compression_ratio: float) -> torch.Tensor:
    """Every (batch, head) keeps its own best `(1 - ratio) * available` tokens."""
    return top_k_keep_mask(scores, available, kept_count(available.sum(-1), compression_ratio))


def layer_budget(available: torch.Tensor, compression_ratio: float) -> torch.Tensor:
    """(batch,) int64: the layer's total budget, the sum of what each head would keep on its own."""
    return kept_count(available.sum(-1), compression_ratio).sum(-1)


def safeguarded_scores(
    scores: torch.Tensor, available: torch.Tensor, budget: torch.Tensor, total_heads: int, alpha_safeguard: float
) -> torch.Tensor:
    """Ada-KV's safeguard: every head's best `floor(alpha * budget / total_heads)` available tokens get +inf,
    unavailable ones -inf, the rest keep their score. budget: (batch,) layer budget; total_heads: the
    layer's KV heads (more than `scores.shape[1]` when the heads are split over tensor-parallel ranks).
    Returns float32 (batch, heads, seq). -0.0 becomes +0.0, so equal scores compare equal bit for bit."""
    masked = (scores.float() + 0.0).masked_fill(~available, float("-inf"))
    mean_budget = budget.to(torch.float64) / total_heads
    floor = torch.floor(alpha_safeguard * mean_budget).long().unsqueeze(-1)  # (batch, 1)
    floor = torch.minimum(floor, available.sum(-1))  # a head cannot keep more than it has
    guaranteed = (descending_rank(masked, dim=-1) < floor.unsqueeze(-1)) & available
    return masked.masked_fill(guaranteed, float("inf"))


def adaptive_keep_mask(
    scores: torch.Tensor, available: torch.Tensor, compression_ratio: float, alpha_safeguard: float
) -> torch.Tensor:
    """Ada-KV allocation: the layer keeps the same total as a uniform selection would, but the
    budget flows between heads. Each head is first guaranteed its best `alpha * mean_budget` tokens
    (the safeguard); the rest of the layer's budget goes to the best remaining scores of all heads.

    Ties are broken by position in the layer: among equal scores the lower head index wins, then the
    earlier token (a stable sort of the (heads * seq) scores). adakv.selection.distributed reproduces exactly
    this order when the heads are split over tensor-parallel ranks.
    """
    return adaptive_budget_keep_mask(scores, available, layer_budget(available, compression_ratio), alpha_safeguard)


def adaptive_budget_keep_mask(
    scores: torch.Tensor, available: torch.Tensor, budget: torch.Tensor, alpha_safeguard: float
) -> torch.Tensor:
    """Ada-KV allocation of `budget` (batch,) tokens over the rows ("heads") of each batch row at once, each
    row first guaranteed its best `floor(alpha * budget / rows)` tokens. Rows are a layer's KV heads (Ada-KV)
    or every (layer, KV head) of the model (AdaptivePress(scope="model"))."""
    batch, heads, seq_len = scores.shape
    boosted = safeguarded_scores(scores, available, budget, heads, alpha_safeguard).reshape(batch, heads * seq_len)
    layer_rank = descending_rank(boosted, dim=-1).reshape(batch, heads, seq_len)
    return (layer_rank < budget.view(batch, 1, 1)) & available
