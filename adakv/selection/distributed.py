"""Ada-KV's layer-wide allocation when a layer's KV heads are split over tensor-parallel ranks.

Under transformers' tensor-parallel plan (`from_pretrained(..., tp_plan="auto")` under torchrun) the
k/v projections are column-sharded: rank r of a group of size W computes KV heads
[r * H / W, (r + 1) * H / W) of every layer, and the cache of each rank holds plain (local) tensors of
those heads only. Uniform presses then run rank-locally as they are. AdaptivePress needs the top
scores of the whole layer, i.e. of every rank's heads, so its selection exchanges a little:

- "all_gather": every rank gathers every rank's (batch, heads / W, seq) scores and availability,
  runs the single-process `adaptive_keep_mask` on the whole layer and keeps its own heads' slice.
  Communication: W x the local scores (4 bytes per (head, token)) per layer.
- "threshold_search": a distributed selection of the k-th largest score. Scores are mapped to
  order-preserving 32-bit integer keys; `radix_bits` bits of the k-th key are fixed per round from a
  histogram that is summed over the ranks (an all-reduce of (batch, 2**radix_bits) counts), so
  32 / radix_bits rounds find it (radix_bits=1 is a bisection on the threshold). Keys above the
  threshold are kept; keys equal to it are taken in the single-process order (lower head first, then
  earlier token: ranks hold consecutive heads, so rank order first, then flat order within a rank).
  Communication: a few small all-reduces per layer, independent of the context length.

Both give exactly the keep set of `adaptive_keep_mask` over the whole layer's scores (tests/test_distributed.py).

AdaptivePress(scope="model") allocates over every (layer, KV head) of the model at once: the same two
exchanges run once over all layers (`distributed_model_keep_masks`), in the single-process order of rows
(layer first, then head: rank r's heads of a layer follow those of ranks < r).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .headwise import adaptive_budget_keep_mask, layer_budget, safeguarded_scores

EXCHANGES = ("all_gather", "threshold_search")
KEY_BITS = 32
RADIX_BITS = (1, 2, 4, 8, 16)
DEFAULT_RADIX_BITS = 8


def check_exchange(exchange: str, radix_bits: int = DEFAULT_RADIX_BITS) -> None:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}.")
    if radix_bits not in RADIX_BITS:
        raise ValueError(f"radix_bits must be one of {RADIX_BITS} (bits of the 32-bit key fixed per round), got {radix_bits!r}.")


def distributed_adaptive_keep_mask(
    scores: torch.Tensor,
    available: torch.Tensor,
    compression_ratio: float,
    alpha_safeguard: float,
    group=None,
    exchange: str = "all_gather",
    radix_bits: int = DEFAULT_RADIX_BITS,
) -> torch.Tensor:
    """`adaptive_keep_mask` over a layer whose heads are split over the ranks of `group` (None: the
    default group), in rank order with the same number of heads on every rank.

    scores/available: this rank's (batch, local_heads, seq). Returns this rank's keep mask, the same
    as the matching head slice of `adaptive_keep_mask` over every rank's heads."""
    check_exchange(exchange, radix_bits)
    if scores.shape != available.shape or scores.dim() != 3:
        raise ValueError(
            f"scores {tuple(scores.shape)} and available {tuple(available.shape)} must both be (batch, local_heads, seq)."
        )
    local_budget = layer_budget(available, compression_ratio)
    keep = distributed_budget_keep_mask(
        scores[:, None], available[:, None], local_budget, alpha_safeguard, group, exchange, radix_bits
    )
    return keep[:, 0]


def distributed_model_keep_masks(
    scores: list[torch.Tensor],
    available: list[torch.Tensor],
    compression_ratios: list[float],
    alpha_safeguard: float,
    group=None,
    exchange: str = "all_gather",
    radix_bits: int = DEFAULT_RADIX_BITS,
) -> list[torch.Tensor]:
    """AdaptivePress(scope="model")'s allocation when every layer's heads are split over the ranks.

    scores/available: one (batch, local_heads, seq) tensor per compressed layer (the same shape for all);
    compression_ratios: each layer's ratio. The model keeps the sum of what each head would keep alone.
    Returns this rank's keep mask per layer, the same as the single-process allocation over every
    (layer, head) of the model."""
    check_exchange(exchange, radix_bits)
    if not scores or not len(scores) == len(available) == len(compression_ratios):
        raise ValueError(
            f"one scores, availability and ratio per compressed layer, got {len(scores)}, {len(available)} and "
            f"{len(compression_ratios)} (and at least one layer)."
        )
    if len({tuple(s.shape) for s in scores} | {tuple(a.shape) for a in available}) != 1 or scores[0].dim() != 3:
        raise ValueError(
            "every layer's scores and availability must be (batch, local_heads, seq) of one shape, got "
            f"{[tuple(s.shape) for s in scores]} and {[tuple(a.shape) for a in available]}."
        )
    local_budget = sum(layer_budget(a, ratio) for a, ratio in zip(available, compression_ratios))
    keep = distributed_budget_keep_mask(
        torch.stack(scores, dim=1), torch.stack(available, dim=1), local_budget, alpha_safeguard, group,
        exchange, radix_bits,
    )  # fmt: skip
    return list(keep.unbind(1))


def distributed_budget_keep_mask(
    scores: torch.Tensor, available: torch.Tensor, local_budget: torch.Tensor, alpha_safeguard: float,
    group, exchange: str, radix_bits: int,
) -> torch.Tensor:  # fmt: skip
    """Ada-KV's allocation of the budget summed over ranks (local_budget: this rank's share, (batch,)) over
    the rows (layer, head) of scores/available (batch, layers, local_heads, seq), heads split over the
    ranks; returns this rank's (batch, layers, local_heads, seq) keep mask."""
    check_same_shape_on_every_rank(scores, group)
    budget = local_budget.clone()
    dist.all_reduce(budget, group=group)  # (batch,) the budget of every rank's rows together
    if exchange == "all_gather":
        return gathered_keep_mask(scores, available, budget, alpha_safeguard, group)
    return searched_keep_mask(scores, available, budget, alpha_safeguard, group, radix_bits)


def _all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def check_same_shape_on_every_rank(scores: torch.Tensor, group) -> None:
    """Every rank must hold the same batch, layer count, head count and sequence length (one small all-gather)."""
    shape = torch.tensor(scores.shape, dtype=torch.long, device=scores.device)
    shapes = _all_gather(shape, group)
    if any(not torch.equal(other, shape) for other in shapes):
        raise ValueError(
            "Every tensor-parallel rank must hold scores of the same (batch, layers, local_heads, seq); got "
            f"{[tuple(s.tolist()) for s in shapes]}. Use a number of KV heads divisible by the world size."
        )


def in_single_process_order(parts: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's (batch, layers, local_heads, seq) -> (batch, layers * world * local_heads, seq): rows
    ordered by layer, then rank, then local head, as one process holds them."""
    stacked = torch.stack(parts, dim=2)  # (batch, layers, world, local_heads, seq)
    batch, layers, world, local_heads, seq_len = stacked.shape
    return stacked.reshape(batch, layers * world * local_heads, seq_len)


def gathered_keep_mask(scores, available, budget, alpha_safeguard: float, group) -> torch.Tensor:
    """Exchange (a): gather every rank's rows on every rank, select, keep this rank's heads."""
    batch, layers, local_heads, seq_len = scores.shape
    all_scores = in_single_process_order(_all_gather(scores.float(), group))
    all_available = in_single_process_order(_all_gather(available.to(torch.uint8), group)).bool()
    keep = adaptive_budget_keep_mask(all_scores, all_available, budget, alpha_safeguard)
    keep = keep.view(batch, layers, dist.get_world_size(group), local_heads, seq_len)
    return keep[:, :, dist.get_rank(group)]


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in [0, 2**32) with the same order (-inf lowest, +inf highest).

    -0.0 must have been turned into +0.0 before (safeguarded_scores does), as a sort sees them equal."""
    bits = values.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    negative = bits >= 2**31
    return torch.where(negative, 0xFFFFFFFF - bits, bits + 2**31)


def searched_keep_mask(scores, available, budget, alpha_safeguard: float, group, radix_bits: int) -> torch.Tensor:
    """Exchange (b): find the k-th largest safeguarded score of every rank's rows with all-reduced histograms."""
    batch, layers, local_heads, seq_len = scores.shape
    total_rows = layers * local_heads * dist.get_world_size(group)
    rows = scores.reshape(batch, layers * local_heads, seq_len)
    boosted = safeguarded_scores(rows, available.reshape(rows.shape), budget, total_rows, alpha_safeguard)
    keys = order_keys(boosted).reshape(batch, layers, local_heads * seq_len)
    threshold, needed_ties = kth_largest_key(keys.reshape(batch, -1), budget.clamp(min=1), group, radix_bits)
    above = keys > threshold[:, None, None]
    ties = keys == threshold[:, None, None]
    quota = tie_quota(ties.sum(-1), needed_ties, group)  # (batch, layers) ties this rank may keep per layer
    keep_ties = ties & (torch.cumsum(ties, dim=-1) <= quota[..., None])
    keep = (above | keep_ties) & (budget > 0)[:, None, None]
    return keep.reshape(scores.shape) & available


def kth_largest_key(keys: torch.Tensor, k: torch.Tensor, group, radix_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-th largest key of every row over all ranks (keys: (batch, n) local, k: (batch,) >= 1 and at
    most the row's total count), and how many keys equal to it belong to the top k: ((batch,), (batch,))."""
    batch = keys.shape[0]
    bins = 2**radix_bits
    prefix = torch.zeros(batch, dtype=torch.long, device=keys.device)  # the key's bits fixed so far
    needed = k.clone()  # how many of the keys matching `prefix` still belong to the top k
    for shift in range(KEY_BITS - radix_bits, -1, -radix_bits):
        matches = (keys >> (shift + radix_bits)) == prefix[:, None]
        digits = (keys >> shift) & (bins - 1)
        histogram = torch.zeros(batch, bins, dtype=torch.long, device=keys.device)
        histogram.scatter_add_(1, digits, matches.long())
        dist.all_reduce(histogram, group=group)
        # keys (matching the prefix) with a larger digit than d: a suffix sum without d itself
        larger = histogram.flip(-1).cumsum(-1).flip(-1) - histogram
        holds_kth = (larger < needed[:, None]) & (larger + histogram >= needed[:, None])
        digit = holds_kth.long().argmax(-1)
        needed = needed - larger.gather(1, digit[:, None]).squeeze(1)
        prefix = (prefix << radix_bits) | digit
    return prefix, needed


def tie_quota(local_ties: torch.Tensor, needed_ties: torch.Tensor, group) -> torch.Tensor:
    """(batch, layers) how many of this rank's threshold ties of each layer are kept. Ties go in the
    single-process order of rows: earlier layers first, within a layer the heads of ranks < r first.
    local_ties: (batch, layers) this rank's tie counts; needed_ties: (batch,) ties the top k holds."""
    counts = torch.stack(_all_gather(local_ties, group))  # (world, batch, layers)
    rank = dist.get_rank(group)
    earlier_layers = counts.sum(0).cumsum(-1) - counts.sum(0)  # every rank's ties in layers before each one
    earlier_ranks = counts[:rank].sum(0)  # this layer's ties on the ranks before this one
    return (needed_ties[:, None] - earlier_layers - earlier_ranks).clamp(min=0)
