"""CriticalKVPress: Feng et al., "Identify Critical KV Cache in LLM Inference from an Output
Perturbation Perspective", arXiv 2502.03805."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakv.models import weight_for_local_heads
from adakv.selection import descending_rank, kept_count

from .adaptive import check_scoring_press
from ..base import PrefillContext, WrapperPress
from ..fields import FRACTION, Check
from ..scorer import uniform_compress

# Adds to the scores of the first stage's picks so any later top-k takes them first.
_FIRST_STAGE_BONUS = 1e9


def projected_value_norms(context: PrefillContext, block: int = 4096) -> torch.Tensor:
    """L1 norm of each value after the output projection W_o, averaged over the query heads that
    read it: (batch, kv_heads, seq). This is how much evicting the value could move the output."""
    module, values = context.module, context.values
    batch, kv_heads, seq_len, head_dim = values.shape
    groups = module.num_key_value_groups
    # under tensor parallelism o_proj is row-sharded: use the columns of the heads this rank holds
    weight = weight_for_local_heads(module.o_proj.weight, kv_heads * groups * head_dim)
    weight = weight.float().view(-1, kv_heads, groups, head_dim)  # (hidden, kv_heads, groups, head_dim)
    norms = []
    for start in range(0, seq_len, block):  # blocks bound the (.., seq, hidden) intermediate
        chunk = values[:, :, start : start + block].float()
        projected = torch.einsum("bhsd,ohgd->bhgso", chunk, weight)
        norms.append(projected.abs().sum(-1).mean(2))
    return torch.cat(norms, dim=-1)


@dataclass
class CriticalKVPress(WrapperPress):
    """Two-stage selection around a scoring press (e.g. SnapKVPress).

    Stage 1 keeps each head's best `first_stage_ratio` share of its budget by the inner press's
    attention-based scores. Stage 2 fills the rest by the perturbation estimate: inner score times
    the L1 norm of the value projected by W_o. Wrapped in AdaptivePress this is CriticalAdaKV.

    score(context): (batch, kv_heads, seq), stage-1 picks first, then stage-2 order.
    """

    first_stage_ratio: float = 0.5

    field_rules = {"press": Check(check_scoring_press), "first_stage_ratio": FRACTION}
    reads_hidden_states = False  # values and W_o; its press reads its own

    def layer_compression_ratio(self, context: PrefillContext) -> float:
        return self.press.layer_compression_ratio(context)

    def score(self, context: PrefillContext) -> torch.Tensor:
        base = self.press.score(context).float()
        budget = kept_count(context.available.sum(-1), self.layer_compression_ratio(context))
        first_stage_size = torch.floor(self.first_stage_ratio * budget.double()).long()  # (batch, kv_heads)
        masked = base.masked_fill(~context.available, float("-inf"))
        ranks = descending_rank(masked, dim=-1)
        first_stage = ranks < first_stage_size.unsqueeze(-1)
        # Shift so the weights are non-negative for scorers that are not attention weights (e.g. Knorm): by
        # the lowest *available* score (padding must not shift them: its -inf made every weight inf)
        lowest = base.masked_fill(~context.available, float("inf")).amin(-1, keepdim=True)
        weights = base - lowest.clamp(max=0)  # a head with nothing available: inf, clamped to 0
        perturbation = weights * projected_value_norms(context)
        return perturbation + first_stage * _FIRST_STAGE_BONUS

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        return uniform_compress(self, context)
