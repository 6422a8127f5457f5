"""ScorerPress: presses that score every cached (token, KV head) pair and keep the best ones."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from adakv.selection import uniform_keep_mask

from .base import BasePress, PrefillContext
from .fields import RATIO


@dataclass
class ScorerPress(BasePress):
    """Scores each (token, KV head) pair; every head keeps its best `(1 - compression_ratio)` share.

    compression_ratio: fraction of the context's KV pairs removed, in [0, 1).
    Subclasses implement `score(context) -> (batch, kv_heads, seq)`, higher = keep.
    """

    compression_ratio: float = 0.0
    # True when scores are attention probabilities (in [0, 1], the same scale in every layer), so that
    # AdaptivePress(scope="model") may rank the scores of different layers against each other.
    scores_are_probabilities: ClassVar[bool] = False

    # False where `score` reads the compression ratio or draws new random numbers on every call: such scores are
    # never kept in a memo (`score_memo_key`)
    scores_memoizable: ClassVar[bool] = True

    field_rules = {"compression_ratio": RATIO}

    def score(self, context: PrefillContext) -> torch.Tensor:
        raise NotImplementedError

    def score_memo_key(self, context: PrefillContext) -> tuple | None:
        """Where `memoized_score` keeps this press's scores of `context` in `context.memo`, or None to compute them
        afresh. Scores do not depend on the ratio: the key is the press's class and every other field, the layer,
        and the very `available` and `hidden_states` tensors of the context (kept alive with the scores, so a
        restricted context never matches). A memo is shared by the contexts of one prefill only (a whole prefill's,
        or the evaluation's one dense prefill per sample, compressed many ways), whose layers' keys are the same."""
        if context.memo is None or not self.scores_memoizable:
            return None
        fields = tuple((f.name, repr(getattr(self, f.name))) for f in dataclasses.fields(self) if f.name != "compression_ratio")
        return ("scores", type(self).__module__, type(self).__qualname__, fields, context.layer_idx,
                id(context.available), id(context.hidden_states))

    def layer_compression_ratio(self, context: PrefillContext) -> float:
        """Ratio applied to this layer; presses with per-layer budgets (PyramidKV) override it."""
        return self.compression_ratio

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        return uniform_compress(self, context)


def memoized_score(press, context: PrefillContext) -> torch.Tensor:
    """`press.score(context)`, computed once per memo key (`ScorerPress.score_memo_key`) when the context carries a
    memo and the press's scores may be kept; presses without `score_memo_key` (wrappers that score) always score.
    The scores are not modified by any selection (they are read, never written), so one tensor serves every ratio."""
    key = press.score_memo_key(context) if hasattr(press, "score_memo_key") else None
    if key is None:
        return press.score(context)
    entry = context.memo.get(key)
    if entry is None:
        entry = context.memo[key] = (context.available, context.hidden_states, press.score(context))
    return entry[2]


def uniform_compress(press, context: PrefillContext) -> torch.Tensor | None:
    """Keep mask of a press exposing `score` and `layer_compression_ratio`: per-head top-k."""
    ratio = press.layer_compression_ratio(context)
    if ratio == 0:
        return None
    return uniform_keep_mask(memoized_score(press, context), context.available, ratio)
