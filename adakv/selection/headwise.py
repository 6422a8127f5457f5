"""Scores -> per-head keep masks: uniform top-k and Ada-KV, whose allocation runs the same steps in one process
and across tensor-parallel ranks.

Scores have shape (batch, kv_heads, seq); higher means keep. `available` (same shape, bool) marks the
positions that may be kept at all: real (non-padding) tokens not pruned by an earlier press. Every
selection returns a bool keep mask of that shape, always a subset of `available`.

Ada-KV ranks many rows (a layer's KV heads, or every (layer, KV head) of the model) against each other. Where
those rows live is a `Reduction`'s business: `LOCAL` when this process holds them all, or one of
adakv.selection.distributed's when each tensor-parallel rank holds some heads of every layer. The allocation
(`allocate`) asks it for the three things that need every row, and does the rest itself.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Reduction(Protocol):
    """What an Ada-KV allocation needs from every process that holds some of its rows.

    Rows come as (batch, groups, rows, seq): groups are layers (one for a layer's allocation), rows this
    process's KV heads of each. One process would order every process's rows by group, then process, then
    row; ties are broken in that order, then by position."""

    def total_rows(self, scores: torch.Tensor) -> int:
        """The allocation's rows over every process (after checking that every process holds the same shape)."""
        ...

    def sum(self, counts: torch.Tensor) -> torch.Tensor:
        """(batch,) counts of this process -> their sum over every process."""
        ...

    def top_k(self, boosted: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Bool (batch, groups, rows, seq): which of this process's float32 scores are among the `k` (batch,)
        largest of every process's, ties in the single-process order."""
        ...


class LocalReduction:
    """Every row is in this process: no exchange."""

    def total_rows(self, scores: torch.Tensor) -> int:
        return scores.shape[1] * scores.shape[2]

    def sum(self, counts: torch.Tensor) -> torch.Tensor:
        return counts

    def top_k(self, boosted: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        batch = boosted.shape[0]
        rank = descending_rank(boosted.reshape(batch, -1), dim=-1).reshape(boosted.shape)
        return rank < k.view(batch, 1, 1, 1)


LOCAL = LocalReduction()


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
    unavailable ones -inf, the rest keep their score. budget: (batch,) the allocation's budget; total_heads:
    its rows (more than `scores.shape[1]` when the heads are split over tensor-parallel ranks). Per row, so
    each rank may apply it to its own rows.
    Returns float32 (batch, heads, seq). -0.0 becomes +0.0, so equal scores compare equal bit for bit."""
    masked = (scores.float() + 0.0).masked_fill(~available, float("-inf"))
    mean_budget = budget.to(torch.float64) / total_heads
    floor = torch.floor(alpha_safeguard * mean_budget).long().unsqueeze(-1)  # (batch, 1)
    floor = torch.minimum(floor, available.sum(-1))  # a head cannot keep more than it has
    guaranteed = (descending_rank(masked, dim=-1) < floor.unsqueeze(-1)) & available
    return masked.masked_fill(guaranteed, float("inf"))


def adaptive_keep_mask(
    scores: torch.Tensor, available: torch.Tensor, compression_ratio: float, alpha_safeguard: float,
    reduction: Reduction = LOCAL,
) -> torch.Tensor:  # fmt: skip
    """Ada-KV allocation: the layer keeps the same total as a uniform selection would, but the
    budget flows between heads. Each head is first guaranteed its best `alpha * mean_budget` tokens
    (the safeguard); the rest of the layer's budget goes to the best remaining scores of all heads.

    Ties are broken by position in the layer: among equal scores the lower head index wins, then the
    earlier token (a stable sort of the (heads * seq) scores). With a tensor-parallel `reduction` the
    scores are this rank's heads, and the mask is this rank's slice of the whole layer's.
    """
    return adaptive_budget_keep_mask(
        scores, available, layer_budget(available, compression_ratio), alpha_safeguard, reduction
    )


def adaptive_budget_keep_mask(
    scores: torch.Tensor, available: torch.Tensor, budget: torch.Tensor, alpha_safeguard: float,
    reduction: Reduction = LOCAL,
) -> torch.Tensor:  # fmt: skip
    """Ada-KV allocation of `budget` (batch,) tokens over the rows ("heads") of each batch row at once, each
    row first guaranteed its best `floor(alpha * budget / rows)` tokens. Rows are a layer's KV heads (Ada-KV)
    or any other set (DecodingPress: a layer's heads with a fixed budget). budget: this process's share (the
    reduction sums the shares)."""
    if scores.shape != available.shape or scores.dim() != 3:
        raise ValueError(
            f"scores {tuple(scores.shape)} and available {tuple(available.shape)} must both be (batch, heads, seq)."
        )
    return allocate(scores[:, None], available[:, None], budget, alpha_safeguard, reduction)[:, 0]


def model_keep_masks(
    scores: list[torch.Tensor], available: list[torch.Tensor], compression_ratios: list[float],
    alpha_safeguard: float, reduction: Reduction = LOCAL,
) -> list[torch.Tensor]:  # fmt: skip
    """AdaptivePress(scope="model"): one Ada-KV allocation over every (layer, KV head) of the model.

    scores/available: one (batch, heads, seq) tensor per compressed layer (one shape for all; with a
    tensor-parallel reduction, this rank's heads); compression_ratios: each layer's ratio. The model keeps
    the sum of what each head would keep alone; each (layer, head) is guaranteed its best
    `floor(alpha * total / rows)`. Ties go to the earlier layer, then the lower head, then the earlier token.
    Returns one keep mask per layer, on the device of that layer's `available`."""
    if not scores or not len(scores) == len(available) == len(compression_ratios):
        raise ValueError(
            f"one scores, availability and ratio per compressed layer, got {len(scores)}, {len(available)} and "
            f"{len(compression_ratios)} (and at least one layer)."
        )
    if len({tuple(s.shape) for s in scores} | {tuple(a.shape) for a in available}) != 1 or scores[0].dim() != 3:
        raise ValueError(
            "every layer's scores and availability must be (batch, heads, seq) of one shape, got "
            f"{[tuple(s.shape) for s in scores]} and {[tuple(a.shape) for a in available]}."
        )
    device = available[0].device  # layers may sit on several devices (device_map): allocate on the first's
    budget = sum(layer_budget(a, ratio).to(device) for a, ratio in zip(available, compression_ratios))
    keep = allocate(
        torch.stack([s.float().to(device) for s in scores], dim=1), torch.stack([a.to(device) for a in available], dim=1),
        budget, alpha_safeguard, reduction,
    )  # fmt: skip
    return [keep[:, layer].to(a.device) for layer, a in enumerate(available)]


def allocate(
    scores: torch.Tensor, available: torch.Tensor, budget: torch.Tensor, alpha_safeguard: float, reduction: Reduction
) -> torch.Tensor:
    """The one Ada-KV allocation. scores/available: (batch, groups, rows, seq) of this process; budget:
    (batch,) this process's share. The reduction sums the budget and counts the rows over every process, the
    safeguard (per row) is applied here, and the reduction picks the top `budget` of every process's
    safeguarded scores. Returns this process's (batch, groups, rows, seq) keep mask."""
    batch, groups, rows, seq_len = scores.shape
    total_rows = reduction.total_rows(scores)
    budget = reduction.sum(budget)
    boosted = safeguarded_scores(
        scores.reshape(batch, groups * rows, seq_len), available.reshape(batch, groups * rows, seq_len),
        budget, total_rows, alpha_safeguard,
    )  # fmt: skip
    return reduction.top_k(boosted.view(scores.shape), budget) & available
