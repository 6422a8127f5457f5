"""Ada-KV's allocation when a layer's KV heads are split over tensor-parallel ranks: the reductions.

Under transformers' tensor-parallel plan (`from_pretrained(..., tp_plan="auto")` under torchrun) the
k/v projections are column-sharded: rank r of a group of size W computes KV heads
[r * H / W, (r + 1) * H / W) of every layer, and the cache of each rank holds plain (local) tensors of
those heads only. Uniform presses then run rank-locally as they are. Ada-KV needs the top scores of the
whole layer (or model), i.e. of every rank's heads. The allocation itself is the single-process one
(headwise.allocate: budget, safeguard, top-k); what needs every rank is a `Reduction`, here one of two:

- "all_gather" (`AllGatherReduction`): every rank gathers every rank's (batch, groups, heads / W, seq)
  safeguarded scores, ranks them as one process would and keeps its own heads' slice.
  Communication: W x the local scores (4 bytes per (head, token)) per allocation.
- "threshold_search" (`ThresholdSearchReduction`): a distributed selection of the k-th largest score. Scores
  are mapped to order-preserving 32-bit integer keys; `radix_bits` bits of the k-th key are fixed per round
  from a histogram that is summed over the ranks (an all-reduce of (batch, 2**radix_bits) counts), so
  32 / radix_bits rounds find it (radix_bits=1 is a bisection on the threshold). Keys above the
  threshold are kept; keys equal to it are taken in the single-process order (earlier layer first, then
  lower head: ranks hold consecutive heads, so rank order, then flat order within a rank).
  Communication: a few small all-reduces per allocation, independent of the context length.

Both also sum the budget over the ranks (one all-reduce) and check that every rank holds scores of one shape
(one small all-gather). Both give exactly the single-process keep set, for a layer (AdaptivePress) and for
every (layer, head) of the model at once (scope="model"; tests/test_distributed.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from adakv.models import tensor_parallel_group

from .headwise import LOCAL, Reduction

EXCHANGES = ("all_gather", "threshold_search")
KEY_BITS = 32
RADIX_BITS = (1, 2, 4, 8, 16)
DEFAULT_RADIX_BITS = 8


def check_exchange(exchange: str, radix_bits: int = DEFAULT_RADIX_BITS) -> None:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}.")
    if radix_bits not in RADIX_BITS:
        raise ValueError(f"radix_bits must be one of {RADIX_BITS} (bits of the 32-bit key fixed per round), got {radix_bits!r}.")


def tensor_parallel_reduction(group=None, exchange: str = "all_gather", radix_bits: int = DEFAULT_RADIX_BITS) -> Reduction:
    """The reduction over the ranks of `group` (None: the default group), which hold consecutive and equally
    many heads in rank order. exchange: "all_gather" or "threshold_search" (module docstring)."""
    check_exchange(exchange, radix_bits)
    if exchange == "all_gather":
        return AllGatherReduction(group)
    return ThresholdSearchReduction(group, radix_bits)


def reduction_for(module: nn.Module, local_heads: int, exchange: str = "all_gather") -> Reduction:
    """The reduction of an allocation over the KV heads of attention `module`, of which this process holds
    `local_heads`: LOCAL, unless transformers' tensor-parallel plan split them over ranks
    (adakv.models.tensor_parallel_group)."""
    group = tensor_parallel_group(module, local_heads)
    return LOCAL if group is None else tensor_parallel_reduction(group, exchange)


class TensorParallelReduction:
    """What both exchanges share: the rows' count and the budget's sum over the ranks of `group`."""

    def __init__(self, group=None):
        self.group = group

    def total_rows(self, scores: torch.Tensor) -> int:
        check_same_shape_on_every_rank(scores, self.group)
        return scores.shape[1] * scores.shape[2] * dist.get_world_size(self.group)

    def sum(self, counts: torch.Tensor) -> torch.Tensor:
        total = counts.clone()
        dist.all_reduce(total, group=self.group)
        return total


class AllGatherReduction(TensorParallelReduction):
    """Exchange (a): gather every rank's rows on every rank, rank them in one process's order, keep this rank's."""

    def top_k(self, boosted: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        batch, groups, rows, seq_len = boosted.shape
        keep = LOCAL.top_k(in_single_process_order(_all_gather(boosted, self.group)), k)
        return keep.view(batch, groups, dist.get_world_size(self.group), rows, seq_len)[:, :, dist.get_rank(self.group)]


class ThresholdSearchReduction(TensorParallelReduction):
    """Exchange (b): find the k-th largest score of every rank's rows with all-reduced histograms."""

    def __init__(self, group=None, radix_bits: int = DEFAULT_RADIX_BITS):
        super().__init__(group)
        self.radix_bits = radix_bits

    def top_k(self, boosted: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        batch, groups, rows, seq_len = boosted.shape
        keys = order_keys(boosted).reshape(batch, groups, rows * seq_len)
        threshold, needed_ties = kth_largest_key(keys.reshape(batch, -1), k.clamp(min=1), self.group, self.radix_bits)
        above = keys > threshold[:, None, None]
        ties = keys == threshold[:, None, None]
        quota = tie_quota(ties.sum(-1), needed_ties, self.group)  # (batch, groups) ties this rank may keep per group
        keep_ties = ties & (torch.cumsum(ties, dim=-1) <= quota[..., None])
        keep = (above | keep_ties) & (k > 0)[:, None, None]
        return keep.reshape(boosted.shape)


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
    """Every rank's (batch, groups, local_heads, seq) -> (batch, groups, world * local_heads, seq): each
    group's rows ordered by rank, then local head, as one process holds them."""
    stacked = torch.stack(parts, dim=2)  # (batch, groups, world, local_heads, seq)
    batch, groups, world, local_heads, seq_len = stacked.shape
    return stacked.reshape(batch, groups, world * local_heads, seq_len)


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in [0, 2**32) with the same order (-inf lowest, +inf highest).

    -0.0 must have been turned into +0.0 before (safeguarded_scores does), as a sort sees them equal."""
    bits = values.float().contiguous().view(torch.int32).long() & 0xFFFFFFFF
    negative = bits >= 2**31
    return torch.where(negative, 0xFFFFFFFF - bits, bits + 2**31)


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
    """(batch, groups) how many of this rank's threshold ties of each group (layer) are kept. Ties go in the
    single-process order of rows: earlier groups first, within a group the heads of ranks < r first.
    local_ties: (batch, groups) this rank's tie counts; needed_ties: (batch,) ties the top k holds."""
    counts = torch.stack(_all_gather(local_ties, group))  # (world, batch, groups)
    rank = dist.get_rank(group)
    earlier_groups = counts.sum(0).cumsum(-1) - counts.sum(0)  # every rank's ties in groups before each one
    earlier_ranks = counts[:rank].sum(0)  # this group's ties on the ranks before this one
    return (needed_ties[:, None] - earlier_groups - earlier_ranks).clamp(min=0)
