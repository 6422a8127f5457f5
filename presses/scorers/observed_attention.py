"""ObservedAttentionPress (H2O): Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models", arXiv 2306.14048."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..base import PrefillContext
from ..scorer import ScorerPress
from .padding import leading_padding


@dataclass
class ObservedAttentionPress(ScorerPress):
    """Keeps the "heavy hitters": the keys that received the most attention during the prefill.

    score (batch, kv_heads, seq): attention weights (batch, heads, seq, seq) averaged over all
    context queries and over the query heads sharing each KV head. Only eager attention returns
    weights, so the model must be loaded with attn_implementation="eager". The query rows of left
    padding (fully masked, they spread uniform weight over every key) are left out of the mean, so a
    padded row scores as the row alone.
    """

    refuses_chunked_prefill: ClassVar[str] = (
        "a later chunk's attention weights also cover the earlier chunks, so they are not the weights of the "
        "chunk alone. Use an ordinary prefill."
    )

    scores_are_probabilities = True  # softmax attention weights
    reads_hidden_states = False  # the attention weights only

    def score(self, context: PrefillContext) -> torch.Tensor:
        if context.attentions is None:
            raise ValueError(
                "ObservedAttentionPress needs the attention weights, which only eager attention returns. "
                'Load the model with attn_implementation="eager" (e.g. '
                'AutoModelForCausalLM.from_pretrained(..., attn_implementation="eager")).'
            )
        batch, heads, queries, seq_len = context.attentions.shape
        kv_heads = context.keys.shape[1]
        # the queries of the real tokens: after each row's left padding (among the last `queries` keys)
        lead = leading_padding(context.available)[:, None] - (seq_len - queries)  # (batch, 1)
        real = torch.arange(queries, device=lead.device)[None, :] >= lead  # (batch, queries)
        weights = real.float() / real.sum(-1, keepdim=True).clamp(min=1)
        received = torch.einsum("bhqs,bq->bhs", context.attentions.float(), weights)  # (batch, heads, seq)
        return received.view(batch, kv_heads, heads // kv_heads, seq_len).mean(dim=2)
