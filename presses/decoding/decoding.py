"""DecodingPress: compress the KV cache again every few generated tokens, so that a long generation
(a reasoning trace, a long answer) holds a bounded cache instead of one that grows with every token."""

from __future__ import annotations

from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

import torch
from torch import nn

from adakv.attention import CACHE_ATTRIBUTE
from adakv.cache import MaskedLayer, make_compressed_layer
from adakv.flat.layer import FlatHeadwiseLayer
from adakv.selection import adaptive_budget_keep_mask, top_k_keep_mask

from ..wrappers.adaptive import AdaptivePress, check_scoring_press
from ..base import BasePress, PrefillContext, check_integer_fields, real_token_mask
from ..scorers.observed_attention import ObservedAttentionPress

QUERY_WINDOW_FIELDS = ("window_size", "n_recent", "n_last")  # how presses name the recent queries they read


def query_window(press: BasePress) -> int:
    """The number of most recent queries a press (and the presses inside it) reads when scoring."""
    return max(getattr(inner, name, 0) for inner in press.press_tree() for name in QUERY_WINDOW_FIELDS)


@dataclass
class RecentInputs:
    """One layer's most recent inputs, at least the last `limit` tokens once that many arrived: pieces of
    (hidden states (batch, n, hidden), cos, sin (batch, n, rotary_dim)), concatenated only when a compression
    reads them (a decode step adds a reference, no copy); and the tokens added since the last compression."""

    pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    since_compression: int = 0

    def add(self, hidden_states: torch.Tensor, position_embeddings, limit: int) -> None:
        batch = hidden_states.shape[0]
        cos, sin = (t.expand(batch, *t.shape[1:]) for t in position_embeddings)
        if hidden_states.shape[1] >= limit:  # a prefill: copies, so a prompt's activations are not kept alive
            self.pieces = [tuple(t[:, -limit:].clone() for t in (hidden_states, cos, sin))]
            return
        self.pieces.append((hidden_states, cos, sin))
        while sum(piece[0].shape[1] for piece in self.pieces[1:]) >= limit:
            self.pieces.pop(0)

    def last(self, limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden_states, cos, sin) of the last `limit` tokens (fewer if fewer arrived)."""
        if len(self.pieces) > 1:
            self.pieces = [tuple(torch.cat(parts, dim=1)[:, -limit:] for parts in zip(*self.pieces))]
        return self.pieces[0]


def right_aligned_rows(layer: FlatHeadwiseLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values (batch, kv_heads, max_length, head_dim) of every head's used rows, aligned to the
    right (zero-filled in front) so that the newest tokens share the last positions in every head, and
    the (batch, kv_heads, max_length) bool mask of real rows."""
    width = layer.max_length
    shift = width - layer.lengths  # (sequences,)
    steps = torch.arange(width, device=layer.device)
    valid = steps[None, :] >= shift[:, None]
    index = torch.where(valid, layer.offsets[:, None] + steps[None, :] - shift[:, None], 0)
    shape = (layer.batch_size, layer.num_heads, width, layer.head_dim)
    keys = layer.keys[index].masked_fill(~valid[..., None], 0).view(shape)
    values = layer.values[index].masked_fill(~valid[..., None], 0).view(shape)
    return keys, values, valid.view(shape[:3])


def left_aligned(keep: torch.Tensor, layer: FlatHeadwiseLayer) -> torch.Tensor:
    """A right-aligned keep mask (batch, kv_heads, max_length) in the order of each head's used rows
    (j = the head's j-th used row), as FlatHeadwiseLayer.recompress takes it."""
    width = keep.shape[-1]
    shift = width - layer.lengths
    index = (torch.arange(width, device=keep.device)[None, :] + shift[:, None]).clamp(max=width - 1)
    return keep.reshape(layer.num_sequences, width).gather(-1, index).view(keep.shape)


def decoding_view(layer, attention_mask: torch.Tensor | None):
    """Keys, values (batch, kv_heads, seq, head_dim) and available (batch, kv_heads, seq) of what a layer
    holds now, the newest tokens last; seq is the dense length, or each head's used rows for "evict"."""
    if isinstance(layer, FlatHeadwiseLayer):
        return right_aligned_rows(layer)
    batch, kv_heads, seq_len = layer.keys.shape[:3]
    available = real_token_mask(attention_mask, batch, seq_len, layer.keys.device)[:, None].expand(-1, kv_heads, -1)
    if isinstance(layer, MaskedLayer):
        available = available & layer.keep_mask(seq_len)
    return layer.keys, layer.values, available


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
    positions of the last `hidden_states_buffer_size` tokens (kept by the hook for every layer; hence
    `hidden_states`/`position_embeddings` cover only those, (batch, <= buffer, ...)). The buffer must hold at
    least the press's query window (SnapKV's window_size, ExpectedAttention's n_recent). The buffered tokens
    may include tokens already evicted, so SnapKV's causal mask inside its window is approximate when its
    window is longer than `compression_interval`. Presses that need the attention weights, the whole
    context's hidden states (ChunkPress, BlockPress) or change keys (KeyRerotationPress) are refused.

    Backends: "evict" compacts the flat cache in place (FlatHeadwiseLayer.recompress) to the kept rows plus
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
    # per cache (dropped with it) and layer: the recent inputs the next compression scores with
    _recent: WeakKeyDictionary = field(default_factory=WeakKeyDictionary, init=False, repr=False, compare=False)

    def inner_presses(self) -> tuple[BasePress, ...]:
        return (self.press,)

    def __post_init__(self):
        super().__post_init__()
        check_scoring_press(self.scorer, "DecodingPress")
        if any(isinstance(inner, ObservedAttentionPress) for inner in self.press.press_tree()):
            raise TypeError("DecodingPress scores without attention weights; ObservedAttentionPress needs them.")
        check_integer_fields(self, {"compression_interval": 1, "target_size": 1, "hidden_states_buffer_size": 1})
        window = query_window(self.press)
        if window > self.hidden_states_buffer_size:
            raise ValueError(
                f"hidden_states_buffer_size ({self.hidden_states_buffer_size}) must be at least the press's query "
                f"window ({window}, its window_size / n_recent / n_last)."
            )

    @property
    def scorer(self) -> BasePress:
        """The press whose `score` ranks the tokens (inside AdaptivePress, the wrapped one)."""
        return self.press.press if isinstance(self.press, AdaptivePress) else self.press

    def compress(self, context: PrefillContext) -> None:
        """The context is not compressed; its last inputs are remembered for the first decoding compression."""
        cache = getattr(context.module, CACHE_ATTRIBUTE, None)
        if cache is None:
            return None
        layers = self._recent.setdefault(cache, {})
        if not self._receiving_context_chunks or context.layer_idx not in layers:  # a new context
            layers[context.layer_idx] = RecentInputs()
        layers[context.layer_idx].add(context.hidden_states, context.position_embeddings, self.hidden_states_buffer_size)
        return None

    def after_appended_tokens(self, module: nn.Module, cache, hidden_states: torch.Tensor, kwargs: dict) -> None:
        recent = self._recent.setdefault(cache, {}).setdefault(module.layer_idx, RecentInputs())
        recent.add(hidden_states, kwargs["position_embeddings"], self.hidden_states_buffer_size)
        recent.since_compression += hidden_states.shape[1]
        if recent.since_compression >= self.compression_interval:
            recent.since_compression = 0
            self.recompress_layer(module, cache, recent, kwargs.get("attention_mask"))

    def recompress_layer(self, module: nn.Module, cache, recent: RecentInputs, attention_mask) -> None:
        """Score everything layer `module.layer_idx` holds and keep each head's share of the target."""
        index = module.layer_idx
        layer = cache.layers[index]
        keys, values, available = decoding_view(layer, attention_mask)
        hidden_states, cos, sin = recent.last(self.hidden_states_buffer_size)
        context = PrefillContext(
            module=module,
            hidden_states=hidden_states,
            keys=keys,
            values=values,
            position_embeddings=(cos, sin),
            attentions=None,
            available=available,
            layer_idx=index,
            num_layers=module.config.num_hidden_layers,
        )
        keep = self.select(context)
        if torch.equal(keep, available):
            return  # within the target already
        if isinstance(layer, FlatHeadwiseLayer):
            layer.recompress(left_aligned(keep, layer), slack=self.compression_interval)
        elif isinstance(layer, MaskedLayer):
            layer.restrict_to(keep)
        else:  # still dense: the first compression of this layer
            cache.layers[index] = make_compressed_layer(self.backend_for_module(module), keys, values, keep, module.config)

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
