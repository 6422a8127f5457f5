"""CURPress: token importance from the low-rank structure of keys and values (leverage scores), after
Sengupta, Chaudhary and Chakraborty, "Value-Guided KV Compression for LLMs via Approximated CUR
Decomposition" (CurDKV), arXiv 2509.15038."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PrefillContext
from ..fields import Integer, OneOf
from ..scorer import ScorerPress
from .streaming_llm import first_available

LEVERAGE_SOURCES = ("keys", "values", "keys_and_values")


def leverage_scores(rows: torch.Tensor, available: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank-`rank` leverage score of every row of each (batch, head) matrix.

    rows: (batch, heads, seq, dim); available: (batch, heads, seq) bool, the rows that form the matrix.
    Returns (batch, heads, seq) float32: ||U_r[i]||^2 for the top `rank` left singular vectors U_r of
    the matrix of available rows (0 for the others). They lie in [0, 1] and sum to the matrix's rank
    (at most `rank`).

    Exact truncated SVD through the (dim, dim) Gram matrix: X^T X = W diag(s^2) W^T, U = X W / s, so
    only a (dim x dim) eigendecomposition per head is needed, whatever the sequence length.
    """
    matrix = rows.float() * available[..., None]
    gram = (matrix.transpose(-1, -2) @ matrix).double()  # (batch, heads, dim, dim)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    rank = min(rank, rows.shape[-1])
    eigenvalues, eigenvectors = eigenvalues[..., -rank:], eigenvectors[..., -rank:]
    # directions with (numerically) zero singular value span nothing: leave them out
    tolerance = eigenvalues[..., -1:].clamp(min=0) * rows.shape[-1] * torch.finfo(torch.float32).eps
    inverse_singular = torch.where(eigenvalues > tolerance, eigenvalues.clamp(min=1e-300).rsqrt(), 0.0)
    left_singular = (matrix @ eigenvectors.float()) * inverse_singular.float()[..., None, :]  # (.., seq, rank)
    return left_singular.square().sum(-1)


@dataclass
class CURPress(ScorerPress):
    """Keeps the tokens whose keys and values matter most to the low-rank structure of their head
    (CUR-style row selection by leverage scores). Attention-free: it reads only the cached keys
    (rotated, as stored) and values.

    For each (batch, KV head) the leverage score of a token is the squared norm of its row in the top
    `rank` left singular vectors of the (seq, head_dim) key matrix (or value matrix): how much of the
    dominant subspace only that token spans. This computes it exactly (truncated SVD via the
    head_dim x head_dim Gram matrix), where CurDKV approximates it with a Gaussian sketch.

    leverage_of: "keys", "values", or "keys_and_values" (default, as CurDKV: the product of both).
    rank: number of singular directions (clamped to head_dim).

    n_sink: the first `n_sink` real tokens of each head (the attention sinks) are always kept: their score
    is set to 1, the largest a leverage score can be, and ties keep the earlier token, so a per-head top-k
    takes them before any other token. Leverage alone does not protect them: by leverage only, position 0
    was evicted in 80 of 90 (layer, head) pairs on the samples of issue 25, and the answers degenerated.
    CurDKV's selection is described by leverage alone (whether its code protects sinks is not checked);
    kvpress's CURPress sets its first 4 scores to 1 likewise (docs/PRESSES.md). n_sink=0 gives pure
    leverage selection. Under AdaptivePress a sink ties with other heads' leverage-1 rows and the lower
    head wins the tie; only heads holding about `rank` tokens or fewer have many such rows.

    score: (batch, kv_heads, seq) leverage scores, higher = keep, rounded to 1e-6 so that rows of equal
    leverage (e.g. every row of a head holding at most `rank` tokens has leverage 1) tie exactly rather
    than by rounding noise; ties keep the earlier token. Sinks score 1.
    """

    rank: int = 32
    leverage_of: str = "keys_and_values"
    n_sink: int = 4

    field_rules = {"rank": Integer(1), "leverage_of": OneOf(LEVERAGE_SOURCES), "n_sink": Integer(0)}
    reads_hidden_states = False  # keys and values only

    def score(self, context: PrefillContext) -> torch.Tensor:
        available = context.available
        scores = torch.ones_like(available, dtype=torch.float32)
        if self.leverage_of in ("keys", "keys_and_values"):
            scores = scores * leverage_scores(context.keys, available, self.rank)
        if self.leverage_of in ("values", "keys_and_values"):
            scores = scores * leverage_scores(context.values, available, self.rank)
        return scores.round(decimals=6).masked_fill(first_available(available, self.n_sink), 1.0)
