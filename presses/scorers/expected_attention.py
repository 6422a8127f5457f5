"""ExpectedAttentionPress: Devoto et al., "Expected Attention: KV cache compression by estimating
attention from future queries distribution", arXiv 2510.00636."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adakv.models import pre_rope_queries, rope_cos_sin, rotate

from ..base import PrefillContext
from ..fields import Flag, Integer
from ..scorer import ScorerPress
from .streaming_llm import first_available


def future_rope(context: PrefillContext, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (batch, n, rotary_dim) at `offsets` (n,) positions after each sequence's last context
    token, by composing the last token's own cos/sin with the rotation by each offset. This needs no
    assumption about the absolute positions (left padding, ...)."""
    cos_last, sin_last = (t[:, -1:].float() for t in context.position_embeddings)  # (batch, 1, rotary_dim)
    cos_step, sin_step = rope_cos_sin(context.module, offsets[None])  # (1, n, rotary_dim), scaled by m
    scale = (cos_step * cos_step + sin_step * sin_step).sqrt()  # m, the rope's attention scaling
    cos = (cos_last * cos_step - sin_last * sin_step) / scale
    sin = (sin_last * cos_step + cos_last * sin_step) / scale
    return cos, sin


def rotation_matrix(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, rotary_dim) cos/sin -> (batch, head_dim, head_dim) R with rotate(x) = R @ x."""
    identity = torch.eye(head_dim, device=cos.device, dtype=cos.dtype).expand(cos.shape[0], head_dim, head_dim)
    return rotate(identity, cos[:, None], sin[:, None]).transpose(-1, -2)


@dataclass
class ExpectedAttentionPress(ScorerPress):
    """Scores each key by the attention that future queries are expected to pay it.

    The next `n_future_positions` queries are modelled as Gaussian: mean mu and (if `use_covariance`)
    covariance Sigma of the last `n_recent` pre-RoPE context queries of each head, rotated by the RoPE
    rotation averaged over the future positions. For q ~ N(mu, Sigma),
    E[exp(s q.k)] = exp(s mu.k + s^2 k^T Sigma k / 2) with s the attention scaling (1/sqrt(d)); this is
    normalised over the available keys, averaged over the query heads of each KV group and (if
    `use_value_norm`) multiplied by ||v||. The first `n_sink` real tokens are always kept.

    score: (batch, kv_heads, seq).
    """

    n_future_positions: int = 512
    n_recent: int = 128
    n_sink: int = 4
    use_covariance: bool = True
    use_value_norm: bool = True

    field_rules = {
        "n_future_positions": Integer(1),
        "n_recent": Integer(1),
        "n_sink": Integer(0),
        "use_covariance": Flag(),
        "use_value_norm": Flag(),
    }

    @property
    def hidden_states_rows(self) -> int:
        """The `n_recent` queries of the statistics; the future rotation starts from the last position's cos/sin."""
        return self.n_recent

    @property
    def scores_are_probabilities(self) -> bool:
        """Expected softmax weights are probabilities; multiplied by ||v|| (use_value_norm) they are not."""
        return not self.use_value_norm

    def query_statistics(self, context: PrefillContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean (batch, heads, head_dim) and covariance (batch, heads, head_dim, head_dim) or None of
        the last `n_recent` pre-RoPE queries, counting only real tokens."""
        recent = min(self.n_recent, context.seq_len)
        queries = pre_rope_queries(context.module, context.newest_inputs(recent)[0]).float()
        real = context.available.any(dim=1)[:, -recent:].float()  # (batch, recent)
        weights = (real / real.sum(-1, keepdim=True).clamp(min=1))[:, None, :, None]  # (batch, 1, recent, 1)
        mean = (queries * weights).sum(dim=2)
        if not self.use_covariance:
            return mean, None
        centred = (queries - mean[:, :, None]) * weights.sqrt()
        return mean, centred.transpose(-1, -2) @ centred

    def score(self, context: PrefillContext) -> torch.Tensor:
        module, keys = context.module, context.keys.float()
        batch, kv_heads, seq_len, head_dim = keys.shape
        mean, covariance = self.query_statistics(context)
        offsets = torch.arange(1, self.n_future_positions + 1, device=keys.device)
        cos, sin = future_rope(context, offsets)
        cos, sin = cos.mean(dim=1), sin.mean(dim=1)  # the averaged rotation is linear in (cos, sin)

        groups = mean.shape[1] // kv_heads
        mean = rotate(mean, cos[:, None], sin[:, None]).view(batch, kv_heads, groups, head_dim)
        logits = module.scaling * torch.einsum("bhgd,bhsd->bhgs", mean, keys)
        if covariance is not None:
            rotation = rotation_matrix(cos, sin, head_dim)[:, None]  # (batch, 1, head_dim, head_dim)
            covariance = (rotation @ covariance @ rotation.transpose(-1, -2)).view(
                batch, kv_heads, groups, head_dim, head_dim
            )
            spread = torch.einsum("bhsd,bhgde,bhse->bhgs", keys, covariance, keys)
            logits = logits + 0.5 * module.scaling**2 * spread

        logits = logits.masked_fill(~context.available[:, :, None], float("-inf"))
        scores = logits.softmax(dim=-1).nan_to_num(0.0).mean(dim=2)  # (batch, kv_heads, seq)
        if self.use_value_norm:
            scores = scores * context.values.float().norm(dim=-1)
        sinks = first_available(context.available, self.n_sink)
        top = scores.amax(dim=(1, 2), keepdim=True)  # per batch row: a row's scores never depend on the others
        return torch.where(sinks, top + 1.0, scores)
