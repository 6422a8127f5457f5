"""Turning scores into per-head keep masks: uniform top-k, and Ada-KV over a layer's heads or every
(layer, head) of the model. Ada-KV has one code path (headwise.allocate); where its rows live is a
`Reduction`: `LOCAL` in one process, or a tensor-parallel exchange (distributed.py) when each rank holds
some of the heads. `reduction_for(module, local_heads, exchange)` picks it for an attention layer.

Scores have shape (batch, kv_heads, seq); higher means keep. `available` (same shape, bool) marks the
positions that may be kept at all. Every selection returns a bool keep mask of that shape, a subset of
`available`.
"""

from .distributed import EXCHANGES, check_exchange, reduction_for, tensor_parallel_reduction
from .headwise import (
    LOCAL,
    Reduction,
    adaptive_budget_keep_mask,
    adaptive_keep_mask,
    allocate,
    descending_rank,
    kept_count,
    layer_budget,
    model_keep_masks,
    ranks_of_order,
    safeguarded_scores,
    top_k_keep_mask,
    uniform_keep_mask,
)

__all__ = [
    "EXCHANGES",
    "LOCAL",
    "Reduction",
    "adaptive_budget_keep_mask",
    "adaptive_keep_mask",
    "allocate",
    "check_exchange",
    "descending_rank",
    "kept_count",
    "layer_budget",
    "model_keep_masks",
    "ranks_of_order",
    "reduction_for",
    "safeguarded_scores",
    "tensor_parallel_reduction",
    "top_k_keep_mask",
    "uniform_keep_mask",
]
