"""Left padding: a padded row must be compressed exactly as the same prompt alone.

A left-padded row holds its real tokens at the end of the sequence, after `pad` positions that no head may
keep. Scores that depend only on available positions (softmax over available keys, means over available
tokens) already ignore the padding. Scores with a grid of positions (chunks, partitions, blocks counted from
position 0) or drawn per position (random numbers) must start that grid at the row's first real token; these
helpers give each row its own unpadded context, as if it had been prefilled alone.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from ..base import PrefillContext


def leading_padding(available: torch.Tensor) -> torch.Tensor:
    """(batch,) long: the leading positions of each row that no head may keep (its left padding)."""
    return (available.any(1).long().cumsum(-1) == 0).sum(-1)


def relative_positions(available: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions counted from each row's first real token, (batch, 1, seq) float32 (negative on the
    padding), and each row's unpadded length (batch, 1, 1) float32."""
    seq_len = available.shape[-1]
    lead = leading_padding(available).float()[:, None, None]
    steps = torch.arange(seq_len, device=available.device, dtype=torch.float32)
    return steps - lead, seq_len - lead


def row_context(context: PrefillContext, row: int, start: int) -> PrefillContext:
    """Row `row` of the context from position `start` on, as if only those tokens had been prefilled
    (batch 1). Hidden states and cos/sin may cover only the newest tokens (DecodingPress, a whole prefill's
    `layer_input_rows`) or none: they are cut to the positions at or after `start`."""
    length = context.seq_len - start

    def newest(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        rows = tensor if tensor.shape[0] == 1 else tensor[row : row + 1]
        return rows.narrow(1, max(tensor.shape[1] - length, 0), min(tensor.shape[1], length))

    embeddings = context.position_embeddings
    attentions = context.attentions
    if attentions is not None:  # (batch, heads, seq, seq)
        attentions = attentions[row : row + 1, :, start:, start:]
    return replace(
        context,
        hidden_states=newest(context.hidden_states),
        keys=context.keys[row : row + 1, :, start:],
        values=context.values[row : row + 1, :, start:],
        position_embeddings=None if embeddings is None else (newest(embeddings[0]), newest(embeddings[1])),
        attentions=attentions,
        available=context.available[row : row + 1, :, start:],
    )


def padded_rows(context: PrefillContext) -> list[int] | None:
    """Each row's leading padding, or None when no row has any (then nothing needs splitting)."""
    lead = leading_padding(context.available)
    return lead.tolist() if bool(lead.any()) else None


def scores_per_unpadded_row(
    context: PrefillContext, score: Callable[[PrefillContext], torch.Tensor], fill: float = 0.0, always: bool = False
) -> torch.Tensor:
    """`score(context)` (batch, kv_heads, seq), computed for each row on its unpadded context when any row is
    padded (or always, with `always`, for scores that must not depend on the other rows of the batch); the
    padding gets `fill`."""
    leads = padded_rows(context)
    if leads is None and not (always and context.available.shape[0] > 1):
        return score(context)
    leads = leads or [0] * context.available.shape[0]
    out = None
    for row, start in enumerate(leads):
        if start >= context.seq_len:
            continue  # a row of padding only: nothing to score
        part = score(row_context(context, row, start))
        if out is None:
            out = torch.full(context.available.shape, fill, dtype=part.dtype, device=part.device)
        out[row : row + 1, :, start:] = part
    if out is None:
        return torch.full(context.available.shape, fill, dtype=torch.float32, device=context.keys.device)
    return out


def keep_per_unpadded_row(
    context: PrefillContext, compress: Callable[[PrefillContext], torch.Tensor | None], always: bool = False
) -> torch.Tensor | None:
    """`compress(context)`'s keep mask (batch, kv_heads, seq) or None, computed for each row on its unpadded
    context when any row is padded (or always, with `always`); a row whose compress gives None keeps every
    available token, and None comes back only when every row gave None."""
    leads = padded_rows(context)
    if leads is None and not (always and context.available.shape[0] > 1):
        return compress(context)
    leads = leads or [0] * context.available.shape[0]
    keep, changed = torch.zeros_like(context.available), False
    for row, start in enumerate(leads):
        if start >= context.seq_len:
            continue
        part = row_context(context, row, start)
        row_keep = compress(part)
        changed |= row_keep is not None
        keep[row : row + 1, :, start:] = part.available if row_keep is None else row_keep
    return keep if changed else None
