"""FinchPress: Corallo and Papotti, "FINCH: Prompt-guided Key-Value Cache Compression for Large Language
Models", Transactions of the Association for Computational Linguistics (TACL) 2024, arXiv 2408.00167."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakv.selection import kept_count, top_k_keep_mask

from ..base import PrefillContext
from ..fields import Integer
from ..scorer import ScorerPress
from .padding import scores_per_unpadded_row
from .snapkv import mean_window_attention


@dataclass
class FinchPress(ScorerPress):
    """Question-guided compression, chunk by chunk, with a bounded cache.

    Where the question is: the last `window_size` tokens of the prompt are taken as the question (as
    SnapKV's observation window). With `model.generate` on "context + question" that is the question;
    in the pipeline's query-agnostic mode (the context is compressed before any question is seen)
    they are the end of the context, so Finch degrades to a chunked selection guided by the
    context's own last tokens. The question tokens are always kept.

    Selection: the context before the question is read in chunks of `chunk_length` tokens. A cache of
    at most the head's context budget (its `(1 - ratio)` share minus the question tokens) starts empty;
    at each step the candidates are the cache plus the next chunk, the question's queries attend to
    the candidates and the question (softmax over those keys only, averaged over the question tokens
    and the query heads of the KV head), and the best-attended candidates, up to the budget, form the
    new cache. Because the softmax is renormalised over each step's candidates, the result differs
    from one top-k over the whole context. Finch also recomputes the next chunk's keys against the
    compressed cache; here the keys are those of the ordinary full prefill (the press runs after it).
    Cost: one window-attention pass over the sequence per chunk, so seq / chunk_length passes per layer;
    raise `chunk_length` for long contexts.

    score (batch, kv_heads, seq): an order from which the per-head top-`budget` is exactly the final
    cache: question tokens first, then the final cache by its last attention, then the tokens dropped
    at later steps before those dropped earlier (each step by its attention). So AdaptivePress and
    other wrappers can take more or fewer tokens from the same order.
    """

    window_size: int = 64
    chunk_length: int = 512
    scores_memoizable = False  # the order depends on the budget, hence on the ratio


    field_rules = {"window_size": Integer(1), "chunk_length": Integer(1)}

    @property
    def hidden_states_rows(self) -> int:
        """The question's queries (the last `window_size` positions of every row's unpadded context)."""
        return self.window_size

    def score(self, context: PrefillContext) -> torch.Tensor:
        """Chunks count from each row's first real token: a left-padded row is scored on its unpadded
        context, as the row alone."""
        return scores_per_unpadded_row(context, self.unpadded_score)

    def unpadded_score(self, context: PrefillContext) -> torch.Tensor:
        seq_len, available = context.seq_len, context.available
        window = min(self.window_size, seq_len)
        question = torch.zeros_like(available)
        question[..., seq_len - window :] = True
        question &= available
        budget = kept_count(available.sum(-1), self.layer_compression_ratio(context))  # (batch, kv_heads)
        context_budget = (budget - question.sum(-1)).clamp(min=0)

        scores = torch.zeros(available.shape, dtype=torch.float32, device=available.device)
        cache = torch.zeros_like(available)
        context_end = seq_len - window
        for step, start in enumerate(range(0, context_end, self.chunk_length)):
            chunk = torch.zeros_like(available)
            chunk[..., start : min(start + self.chunk_length, context_end)] = True
            candidates = (cache | chunk) & available
            attention = mean_window_attention(context.restrict(candidates | question), window)
            cache = top_k_keep_mask(attention, candidates, context_budget)
            dropped = candidates & ~cache
            # attention is in [0, 1], so 2 * step + attention orders steps first, attention second
            scores = torch.where(dropped | cache, 2.0 * step + attention, scores)
        last_step = 2.0 * (context_end // self.chunk_length + 1)
        scores = torch.where(cache, scores + last_step, scores)
        position = torch.arange(seq_len, device=available.device) / seq_len
        return torch.where(question, 4.0 * last_step + 2.0 + position, scores)
