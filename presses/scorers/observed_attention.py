"""ObservedAttentionPress (H2O): Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models", arXiv 2306.14048."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..base import PrefillContext
from ..scorer import ScorerPress


@dataclass
class ObservedAttentionPress(ScorerPress):
    """Keeps the "heavy hitters": the keys that received the most attention during the prefill.

    score (batch, kv_heads, seq): attention weights (batch, heads, seq, seq) averaged over all
    context queries and over the query heads sharing each KV head. Only eager attention returns
    weights, so the model must be loaded with attn_implementation="eager". (Fully masked query rows
    of left padding spread uniform weight, which shifts every key's score equally.)
    """

    refuses_chunked_prefill: ClassVar[str] = (
        "a later chunk's attention weights also cover the earlier chunks, so they are not the weights of the "
        "chunk alone. Use an ordinary prefill."
    )

    scores_are_probabilities = True  # softmax attention weights

    def score(self, context: PrefillContext) -> torch.Tensor:
        if context.attentions is None:
            raise ValueError(
                "ObservedAttentionPress needs the attention weights, which only eager attention returns. "
                'Load the model with attn_implementation="eager" (e.g. '
                'AutoModelForCausalLM.from_pretrained(..., attn_implementation="eager")).'
            )
        batch, heads, _, seq_len = context.attentions.shape
        kv_heads = context.keys.shape[1]
        received = context.attentions.float().mean(dim=2)  # (batch, heads, seq)
        return received.view(batch, kv_heads, heads // kv_heads, seq_len).mean(dim=2)
