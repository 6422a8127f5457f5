"""Turning scores into per-head keep masks: uniform top-k, Ada-KV within a layer, Ada-KV over any set of
rows (the model-wide scope), and the same Ada-KV selections across tensor-parallel ranks (distributed.py).

Scores have shape (batch, kv_heads, seq); higher means keep. `available` (same shape, bool) marks the
positions that may be kept at all. Every selection returns a bool keep mask of that shape, a subset of
`available`.
"""

from .headwise import (
    adaptive_budget_keep_mask,
    adaptive_keep_mask,
    descending_rank,
    kept_count,
    layer_budget,
    ranks_of_order,
    safeguarded_scores,
    top_k_keep_mask,
    uniform_keep_mask,
)

__all__ = [
    "adaptive_budget_keep_mask",
    "adaptive_keep_mask",
    "descending_rank",
    "kept_count",
    "layer_budget",
    "ranks_of_order",
    "safeguarded_scores",
    "top_k_keep_mask",
    "uniform_keep_mask",
]
