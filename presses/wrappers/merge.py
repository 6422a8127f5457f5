"""MergePress: Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024
(PMLR 235:58840-58850)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..base import PrefillContext, WrapperPress
from ..fields import Check, Integer
from .composed import check_not_rerotation
from ..scorers.snapkv import mean_window_attention


def merge_targets(keep: torch.Tensor, evicted: torch.Tensor, merge_window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position, the positions of the next `merge_window` kept tokens after it in its head.

    keep, evicted: (batch, kv_heads, seq) bool. Returns positions (batch, kv_heads, seq, merge_window)
    long and valid (same shape, bool): True where the position is evicted and that kept token exists."""
    seq_len = keep.shape[-1]
    kept_positions = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # kept positions first, in order
    next_kept = keep.long().cumsum(-1)  # index (among kept tokens) of the first kept token after an evicted one
    index = next_kept[..., None] + torch.arange(merge_window, device=keep.device)
    valid = evicted[..., None] & (index < keep.sum(-1)[..., None, None])
    flat_index = index.clamp(max=seq_len - 1).flatten(-2)
    positions = kept_positions.gather(-1, flat_index).view_as(index)
    return positions, valid


def merge_evicted_values(
    values: torch.Tensor, keep: torch.Tensor, available: torch.Tensor, attention: torch.Tensor, merge_window: int
) -> None:
    """Fold every evicted value into the next `merge_window` kept values of its head, in place.

    values: (batch, kv_heads, seq, head_dim); keep, available: (batch, kv_heads, seq) bool; attention:
    (batch, kv_heads, seq) the attention each token receives. Evicted token i with targets j_1..j_k
    (k <= merge_window kept tokens after it) adds p_i * v_i / k to each target, with
    p_i = min(1, a_i / mean_t a_{j_t}). Then sum_t a_{j_t} (p_i v_i / k) = min(a_i, mean_t a_{j_t}) v_i:
    the evicted term a_i v_i of the attention-weighted sum comes back whenever a_i <= its targets' mean.
    """
    positions, valid = merge_targets(keep, available & ~keep, merge_window)
    attention = attention.float()
    target_attention = attention.gather(-1, positions.flatten(-2)).view_as(positions) * valid
    count = valid.sum(-1)  # (batch, kv_heads, seq)
    mean_target = target_attention.sum(-1) / count.clamp(min=1)
    probability = torch.where(mean_target > 0, (attention / mean_target.clamp(min=1e-30)).clamp(max=1.0), 0.0)
    share = probability / count.clamp(min=1)  # (batch, kv_heads, seq), 0 where nothing merges
    head_dim = values.shape[-1]
    source = (values.float() * share[..., None])[..., None, :].expand(*positions.shape, head_dim)  # (.., seq, m, d)
    source = source * valid[..., None]
    merged = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
    merged.scatter_add_(2, positions.flatten(-2)[..., None].expand(-1, -1, -1, head_dim), source.flatten(2, 3))
    values.add_(merged.to(values.dtype))


@dataclass
class MergePress(WrapperPress):
    """Evicted values are folded into kept neighbours instead of dropped (CaM's cache merging), around
    any token press: the inner press chooses the kept tokens, then each evicted token's value is
    spread over the next `merge_window` kept tokens of its head (a token after the head's last kept
    token has none and is dropped). Keys are never changed.

    Weights: a = the attention each token receives from the last `window_size` queries of the prompt
    (averaged over them and the query heads of the KV head). Evicted token i adds p_i * v_i / k to each
    of its k targets with p_i = min(1, a_i / mean a of the targets), so the kept tokens' attention-
    weighted sum of values regains the evicted term a_i v_i. CaM draws the merge as a Bernoulli
    variable of probability p_i; this press adds its expectation, deterministically.

    Where: the values are edited in place in `context.values`, the cache's own tensor during the
    context prefill, before the backend builds the layer (as KeyRerotationPress does for keys); so both
    backends hold the merged values and give the same logits, and `presses/base.py` needs no extra
    hook. Refused in a chunked prefill, where the evict backend hands a chunk's values out as copies.

    compress -> the inner press's keep mask (batch, kv_heads, seq); context.values edited in place.
    """

    merge_window: int = 4
    window_size: int = 32
    refuses_chunked_prefill: ClassVar[str] = (
        "it folds evicted values into the kept ones in place, and a chunk's cached values are copies under "
        "backend 'evict'. Use an ordinary prefill."
    )

    field_rules = {"press": Check(check_not_rerotation), "merge_window": Integer(1), "window_size": Integer(1)}

    @property
    def hidden_states_rows(self) -> int:
        """The queries of the merge weights (the inner press reads its own)."""
        return self.window_size

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        keep = self.press.compress(context)
        if keep is None:
            return None
        attention = mean_window_attention(context, min(self.window_size, context.seq_len))
        with torch.no_grad():  # an edit of the cache, not part of any computation to differentiate
            merge_evicted_values(context.values, keep, context.available, attention, self.merge_window)
        return keep
