"""KeyRerotationPress: after pruning, move each kept key to the position it would have in a cache
holding only the kept tokens (the idea behind StreamingLLM's "positions within the cache", Xiao et
al., "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from adakv.models import rope_cos_sin, rotate, unrotate

from ..base import PrefillContext, WholePrefill, WrapperPress


def rerotate_kept_keys(context: PrefillContext, keep: torch.Tensor) -> None:
    """Rotate each kept key (batch, kv_heads, seq, head_dim) in place from its position to its rank
    among the kept positions of its (batch, head). Pruned keys are left untouched."""
    context.check_holds_every_input_row("KeyRerotationPress")
    keys = context.keys
    batch, kv_heads, seq_len, _ = keys.shape
    new_positions = (keep.long().cumsum(-1) - 1).clamp(min=0)  # (batch, kv_heads, seq)
    new_cos, new_sin = rope_cos_sin(context.module, new_positions.reshape(batch, kv_heads * seq_len))
    new_cos = new_cos.view(batch, kv_heads, seq_len, -1)
    new_sin = new_sin.view(batch, kv_heads, seq_len, -1)
    old_cos, old_sin = (t.float()[:, None] for t in context.position_embeddings)  # (batch, 1, seq, rotary_dim)
    moved = rotate(unrotate(keys.float(), old_cos, old_sin), new_cos, new_sin)
    keys.copy_(torch.where(keep[..., None], moved.to(keys.dtype), keys))


@dataclass
class KeyRerotationPress(WrapperPress):
    """Prunes with the inner press, then re-rotates every kept key so that the kept keys of each head
    sit at contiguous positions 0, 1, ..., n_kept - 1 in their original order, as if the cache had
    only ever held them. Works per head, so also around AdaptivePress.

    The rotation is undone with the cos/sin the layer used (no assumption on the original
    positions) and redone at the new positions with the model's own rotary embedding. The keys are
    changed in place in `context.keys`, the cache's tensor, so this press must be the outermost one
    (every wrapper refuses it inside, `outermost_only`).
    """

    outermost_only: ClassVar[str] = (
        "KeyRerotationPress rotates the kept keys of the cache to new positions in place, so a press around it "
        "would score, or rotate again, keys that no longer sit at the positions the layer gave them"
    )
    refuses_chunked_prefill: ClassVar[str] = (
        "it re-positions the kept keys of a whole context, which the chunks after it would no longer line up "
        "with. Use its inner press."
    )
    hidden_states_rows = None  # the cos/sin of every position, to undo the rotation

    def compress(self, context: PrefillContext) -> torch.Tensor | None:
        keep = self.press.compress(context)
        if keep is not None:
            rerotate_kept_keys(context, keep)
        return keep

    def compress_prefill(self, prefill: WholePrefill) -> list[torch.Tensor | None]:
        keeps = self.press.compress_prefill(prefill)
        for context, keep in zip(prefill.contexts, keeps):
            if keep is not None:
                rerotate_kept_keys(context, keep)
        return keeps
