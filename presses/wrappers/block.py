"""BlockPress: score and keep a long context block by block, so scoring never sees more than the
kept tokens plus one block (the block-wise compression of Park et al., "KeyDiff: Key Similarity-Based
KV Cache Eviction for Long-Context LLM Inference in Resource-Constrained Environments", arXiv 2504.15364)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from adakv.selection import kept_count, top_k_keep_mask

from ..scorers.padding import keep_per_unpadded_row
from .adaptive import check_scoring_press
from ..base import PrefillContext, WrapperPress
from ..fields import Check, Integer


def gather_along(tensor: torch.Tensor, dim: int, positions: torch.Tensor) -> torch.Tensor:
    """tensor (batch, ..., seq at `dim`, ...) indexed at `positions` (batch, n) along `dim`, per batch row."""
    tensor = tensor.expand(positions.shape[0], *tensor.shape[1:])  # cos/sin may have batch 1
    shape = [positions.shape[0]] + [1] * (tensor.dim() - 1)
    shape[dim] = positions.shape[1]
    index = positions.view(shape).expand(*tensor.shape[:dim], positions.shape[1], *tensor.shape[dim + 1 :])
    return tensor.gather(dim, index)


def gather_context(context: PrefillContext, positions: torch.Tensor, available: torch.Tensor) -> PrefillContext:
    """The context limited to `positions` (batch, n) of each batch row, as if only those tokens had been
    prefilled, with `available` (batch, kv_heads, n)."""
    context.check_holds_every_input_row("BlockPress")
    cos, sin = context.position_embeddings
    attentions = context.attentions
    if attentions is not None:  # (batch, heads, seq, seq): rows and columns
        attentions = gather_along(gather_along(attentions, 2, positions), 3, positions)
    return replace(
        context,
        hidden_states=gather_along(context.hidden_states, 1, positions),
        keys=gather_along(context.keys, 2, positions),
        values=gather_along(context.values, 2, positions),
        position_embeddings=(gather_along(cos, 1, positions), gather_along(sin, 1, positions)),
        attentions=attentions,
        available=available,
    )


def candidate_positions(candidates: torch.Tensor) -> torch.Tensor:
    """(batch, n) positions where any head of the row has a candidate, ascending, n = the largest count;
    rows with fewer are filled at the front with other positions (which no head may keep), like left padding."""
    seq_len = candidates.shape[-1]
    wanted = candidates.any(1)  # (batch, seq)
    steps = torch.arange(seq_len, device=candidates.device)
    order = torch.where(wanted, steps + seq_len, steps).argsort(dim=-1)  # the wanted ones last, in order
    return order[:, seq_len - int(wanted.sum(-1).max()) :]


@dataclass
class BlockPress(WrapperPress):
    """Compresses the context in blocks of `block_size` tokens with bounded scoring memory.

    Each head's budget is the inner scoring press's kept count for the whole context ((1 - ratio) of its
    available tokens). Going through the context block by block, the inner press scores the tokens kept
    so far plus the next block, as if only those had been prefilled (its queries are the block's last
    ones), and each head keeps its best `budget` of them. So scoring never sees more than
    kv_heads x budget + block_size tokens. With a block covering the whole context this is the inner
    press itself; with a score that does not depend on the other tokens (KnormPress) it is too, exactly.

    Unlike ChunkPress, which lets every chunk keep its own share, the kept tokens compete across blocks.
    Blocks start at each row's first real token (a left-padded row is compressed as the row alone).
    Returns keep (batch, kv_heads, seq).
    """

    block_size: int = 512

    field_rules = {"press": Check(check_scoring_press), "block_size": Integer(1)}
    hidden_states_rows = None  # its press reads the newest positions of every block

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        return keep_per_unpadded_row(context, self.unpadded_compress)

    def unpadded_compress(self, context: PrefillContext) -> torch.Tensor | None:
        ratio = self.press.layer_compression_ratio(context)
        if ratio == 0:
            return None
        available = context.available
        budget = kept_count(available.sum(-1), ratio)  # (batch, kv_heads)
        kept = torch.zeros_like(available)
        for start in range(0, context.seq_len, self.block_size):
            candidates = kept.clone()
            candidates[..., start : start + self.block_size] = available[..., start : start + self.block_size]
            positions = candidate_positions(candidates)  # (batch, n)
            head_positions = positions[:, None, :].expand(-1, available.shape[1], -1)
            block = gather_context(context, positions, candidates.gather(-1, head_positions))
            keep = top_k_keep_mask(self.press.score(block), block.available, budget)
            kept = torch.zeros_like(available).scatter_(-1, head_positions, keep)
        return kept
