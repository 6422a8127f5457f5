"""DecodingPress: compress the KV cache again every few generated tokens, so that a long generation
(a reasoning trace, a long answer) holds a bounded cache instead of one that grows with every token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakv.selection import adaptive_budget_keep_mask, top_k_keep_mask

from ..base import BasePress, PrefillContext
from ..fields import Check, Integer
from ..scorers.observed_attention import ObservedAttentionPress
from ..wrappers.adaptive import AdaptivePress, check_scoring_press

def check_decoding_scorer(press, owner: str) -> None:
    """A scoring press, or AdaptivePress around one, that needs no attention weights."""
    check_scoring_press(press.press if isinstance(press, AdaptivePress) else press, owner)
    if any(isinstance(inner, ObservedAttentionPress) for inner in press.press_tree()):
        raise TypeError(f"{owner} scores without attention weights; ObservedAttentionPress needs them.")


@dataclass
class DecodingPress(BasePress):
    """Re-compresses each layer every `compression_interval` tokens added after the context (generated
    tokens, question tokens) down to `target_size` tokens per KV head. The context itself is not compressed
    (PrefillDecodingPress adds a prefill press).

    press: a scoring press (ScorerPress such as SnapKVPress, KnormPress, CriticalKVPress, ...): every head
    keeps its best `target_size` tokens; or AdaptivePress around one: the layer keeps target_size x kv_heads
    tokens allocated across heads by Ada-KV (each head guaranteed alpha_safeguard x target_size). Its
    compression_ratio is not used. It scores a context of everything the layer holds, keys/values
    (batch, kv_heads, seq, head_dim) with the newest tokens last, and as queries the hidden states and
    positions of the last `hidden_states_buffer_size` tokens (kept by the runtime for every layer; hence
    `hidden_states`/`position_embeddings` cover only those, (batch, <= buffer, ...)). The buffer must hold at
    least the press's query window (SnapKV's window_size, ExpectedAttention's n_recent). The buffered tokens
    may include tokens already evicted, so SnapKV's causal mask inside its window is approximate when its
    window is longer than `compression_interval`. Presses that need the attention weights, the whole
    context's hidden states (ChunkPress, BlockPress) or change keys (KeyRerotationPress) are refused.

    The runtime (adakv.runtimes.hf.decoding) counts the appended tokens, builds that context every
    `compression_interval` tokens and applies `select`'s keep mask to the layer.

    Backends: "evict" compacts the flat cache in place (FlatHeadwiseLayer.keep_only) to the kept rows plus
    `compression_interval` free rows per head, so memory stays bounded: at most about
    (target_size + compression_interval) rows per head. "mask" only restricts attention
    (MaskedLayer.restrict_to): its dense cache and mask keep growing. Either way the positions of new tokens
    continue from the dense length. A compression makes every token so far part of the compressed context,
    so the pipeline's rollback to the context after an answer is refused once one has happened.
    """

    press: BasePress
    compression_interval: int = 512
    target_size: int = 2048
    hidden_states_buffer_size: int = 128
    compresses_during_decoding = True

    def inner_presses(self) -> tuple[BasePress, ...]:
        return (self.press,)

    field_rules = {
        "press": Check(check_decoding_scorer),
        "compression_interval": Integer(1),
        "target_size": Integer(1),
        "hidden_states_buffer_size": Integer(1),
    }

    @property
    def hidden_states_rows(self) -> int:
        """What the runtime keeps of a context's newest inputs for the first compression."""
        return self.hidden_states_buffer_size

    def check_combination(self) -> None:
        super().check_combination()
        rows = self.press.layer_input_rows  # what the press tree reads of the newest positions' inputs
        if rows is None:
            raise ValueError(
                f"{type(self.press).__name__} may read the hidden states of every position "
                "(BasePress.hidden_states_rows is None), but DecodingPress holds those of the last "
                f"hidden_states_buffer_size ({self.hidden_states_buffer_size}) tokens only. A press of your own "
                "that reads the last n positions' inputs says so with hidden_states_rows = n (0: none)."
            )
        if rows > self.hidden_states_buffer_size:
            raise ValueError(
                f"hidden_states_buffer_size ({self.hidden_states_buffer_size}) must be at least the press's query "
                f"window ({rows}: the newest positions whose hidden states it reads, e.g. SnapKV's window_size)."
            )

    @property
    def scorer(self) -> BasePress:
        """The press whose `score` ranks the tokens (inside AdaptivePress, the wrapped one)."""
        return self.press.press if isinstance(self.press, AdaptivePress) else self.press

    def compress(self, context: PrefillContext) -> None:
        """The context is not compressed (the runtime keeps its last inputs for the first compression)."""
        return None

    def select(self, context: PrefillContext) -> torch.Tensor:
        """Keep mask (batch, kv_heads, seq): target_size per head, or per head on average with AdaptivePress."""
        scores = self.scorer.score(context)
        available = context.available
        batch, kv_heads = available.shape[:2]
        if isinstance(self.press, AdaptivePress):
            layer_budget = torch.full((batch,), self.target_size * kv_heads, device=available.device)
            return adaptive_budget_keep_mask(scores, available, layer_budget, self.press.alpha_safeguard)
        budget = torch.full((batch, kv_heads), self.target_size, device=available.device)
        return top_k_keep_mask(scores, available, budget)
