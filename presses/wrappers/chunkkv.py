"""ChunkKVPress: Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context
LLM Inference", arXiv 2502.00299."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakv.selection import kept_count, ranks_of_order

from ..scorers.padding import keep_per_unpadded_row
from .adaptive import check_scoring_press
from ..base import PrefillContext, WrapperPress
from ..fields import Check, Flag, Integer


def chunk_mean_scores(
    scores: torch.Tensor, available: torch.Tensor, chunk_length: int, shared_across_heads: bool
) -> torch.Tensor:
    """Each token's chunk score: the mean score of the available tokens of its chunk (chunks of `chunk_length`
    consecutive positions from position 0), over the layer's KV heads too when `shared_across_heads`.

    scores, available: (batch, kv_heads, seq) -> (batch, kv_heads, seq) float32, -inf where not available."""
    batch, kv_heads, seq_len = scores.shape
    num_chunks = -(-seq_len // chunk_length)
    padding = num_chunks * chunk_length - seq_len
    weights = torch.nn.functional.pad(available.float(), (0, padding)).view(batch, kv_heads, num_chunks, chunk_length)
    values = torch.nn.functional.pad(scores.float().masked_fill(~available, 0.0), (0, padding))
    sums = values.view(batch, kv_heads, num_chunks, chunk_length).sum(-1)
    counts = weights.sum(-1)
    if shared_across_heads:
        sums, counts = sums.sum(1, keepdim=True), counts.sum(1, keepdim=True)
    means = (sums / counts.clamp(min=1)).expand(batch, kv_heads, num_chunks)
    per_token = means.repeat_interleave(chunk_length, dim=-1)[..., :seq_len]
    return per_token.masked_fill(~available, float("-inf"))


def rank_by_chunk_then_token(chunk_scores: torch.Tensor, token_scores: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) along the last dim: by chunk score, ties (the same chunk) broken by the token's own score."""
    by_token = token_scores.argsort(dim=-1, descending=True, stable=True)
    by_chunk = chunk_scores.gather(-1, by_token).argsort(dim=-1, descending=True, stable=True)  # stable: keeps token order
    return ranks_of_order(by_token.gather(-1, by_chunk), dim=-1)


@dataclass
class ChunkKVPress(WrapperPress):
    """Keeps whole chunks of `chunk_length` consecutive tokens instead of single tokens, so what is kept
    stays in readable pieces (a phrase with its subject and verb, not scattered words).

    The inner scoring press scores every (token, KV head) pair, (batch, kv_heads, seq). A chunk's score is
    the mean score of its available tokens, also averaged over the layer's KV heads when
    `shared_across_heads` (as in the paper: one chunk selection per layer). Each head takes chunks whole,
    best first, until it has its budget, the inner press's kept count ((1 - ratio) of its available tokens);
    the last chunk taken may be cut, keeping its own best tokens, so the budget is exact. Chunks start at
    each row's first real token (position 0 without left padding; a padded row is chunked as the row
    alone). Returns keep (batch, kv_heads, seq). The paper's layer-wise index reuse is not included.

    Not to be confused with ChunkPress, which compresses a long context piece by piece.
    """

    chunk_length: int = 10
    shared_across_heads: bool = True

    field_rules = {"press": Check(check_scoring_press), "chunk_length": Integer(1), "shared_across_heads": Flag()}
    reads_hidden_states = False  # its press reads its own, of each row's newest positions (`row_context`)

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        return keep_per_unpadded_row(context, self.unpadded_compress)

    def unpadded_compress(self, context: PrefillContext) -> torch.Tensor | None:
        ratio = self.press.layer_compression_ratio(context)
        if ratio == 0:
            return None
        available = context.available
        token_scores = self.press.score(context).float().masked_fill(~available, float("-inf"))
        chunk_scores = chunk_mean_scores(token_scores, available, self.chunk_length, self.shared_across_heads)
        budget = kept_count(available.sum(-1), ratio)  # (batch, kv_heads)
        return (rank_by_chunk_then_token(chunk_scores, token_scores) < budget.unsqueeze(-1)) & available
