"""ThinKPress: Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv 2407.21018."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..base import PrefillContext, WrapperPress
from ..fields import RATIO, Check, Integer
from ..scorers.padding import leading_padding
from .composed import check_not_rerotation


def key_channel_scores(context: PrefillContext, window: int) -> torch.Tensor:
    """(batch, kv_heads, head_dim) float32: ||Q[:, c]|| * ||K[:, c]|| per channel c, the query norm taken
    over the last `window` queries of every query head sharing the KV head (those of real tokens: left
    padding left out), the key norm over the available keys. Both rotated, as attention multiplies them."""
    window_queries = context.last_queries(window)
    batch, kv_heads, _, head_dim = context.keys.shape
    first_real = leading_padding(context.available) - (context.seq_len - window)  # (batch,)
    real = torch.arange(window, device=first_real.device)[None, :] >= first_real[:, None]  # (batch, window)
    window_queries = window_queries * real[:, None, :, None]
    grouped = window_queries.float().reshape(batch, kv_heads, -1, head_dim)  # query heads of a group are adjacent
    keys = context.keys.float() * context.available[..., None]
    return grouped.norm(dim=-2) * keys.norm(dim=-2)


@dataclass
class ThinKPress(WrapperPress):
    """Prunes key *channels*: every KV head drops the `key_channel_compression_ratio` share of its key
    channels with the smallest ||Q[:, c]|| * ||K[:, c]|| (queries of the last `window_size` prompt
    tokens), after the inner token press chose its tokens (ThinK around a token press, e.g.
    ThinKPress(SnapKVPress(0.5))); use an inner press at ratio 0 to prune channels only.

    How: the pruned channels of the context's cached keys are set to zero, in place, before the
    backend builds the layer. That is exact: q . k over a key with zeroed channels equals the product
    with those channels dropped from both query and key, for every later query. Keys appended later
    (question, answer) keep all channels, as in the paper, which leaves recent tokens unpruned.

    Backends: both (the keys are edited before either layer is built, so mask and evict give the same
    logits). Neither saves the pruned channels' memory: the dense and the flat layouts store whole
    key rows of head_dim; backend "evict" frees only the tokens the inner press removed. Refused in a
    chunked prefill (the evict backend hands a chunk's keys out as copies, so an in-place edit would
    not reach the cache).

    compress -> the inner press's keep mask (batch, kv_heads, seq), or every available token when the
    inner press prunes none; context.keys edited in place.
    """

    key_channel_compression_ratio: float = 0.5
    window_size: int = 32
    refuses_chunked_prefill: ClassVar[str] = (
        "it zeroes key channels of the cached context in place, and a chunk's cached keys are copies under "
        "backend 'evict'. Use an ordinary prefill."
    )

    field_rules = {"press": Check(check_not_rerotation), "key_channel_compression_ratio": RATIO, "window_size": Integer(1)}

    @property
    def hidden_states_rows(self) -> int:
        """The window's queries (the inner press reads its own)."""
        return self.window_size

    def pruned_channels(self, context: PrefillContext) -> torch.Tensor:
        """(batch, kv_heads, head_dim) bool: the channels each head drops."""
        scores = key_channel_scores(context, min(self.window_size, context.seq_len))
        head_dim = scores.shape[-1]
        n_pruned = int(self.key_channel_compression_ratio * head_dim)
        lowest = scores.topk(n_pruned, dim=-1, largest=False).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, lowest, True)

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        keep = self.press.compress(context)
        if self.key_channel_compression_ratio == 0:
            return keep
        pruned = self.pruned_channels(context)
        with torch.no_grad():  # an edit of the cache, not part of any computation to differentiate
            context.keys.masked_fill_(pruned[:, :, None, :], 0)
        # with no token pruned, still hand back a mask so the layer is rebuilt from the edited keys
        return context.available if keep is None else keep
