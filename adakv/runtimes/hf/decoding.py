"""Compression during decoding (DecodingPress) inside transformers: the runtime keeps each layer's most
recent inputs, counts the tokens appended after the context and, every `compression_interval` of them,
scores what the layer holds with the press and keeps what its `select` says."""

from __future__ import annotations

from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

import torch
from torch import nn

from adakv.cache import CompressedLayer, make_compressed_layer
from adakv.presses.base import BasePress, PrefillContext
from adakv.presses.decoding.decoding import DecodingPress
from adakv.presses.decoding.prefill_decoding import PrefillDecodingPress

from .attention import real_token_mask


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


def held_view(layer, attention_mask: torch.Tensor | None):
    """Keys, values (batch, kv_heads, seq, head_dim) and available (batch, kv_heads, seq) of what a layer
    holds now, the newest tokens last (a compressed layer's `held_view`, or a dense layer's positions)."""
    if isinstance(layer, CompressedLayer) and not layer.stores_padding_rows:
        return layer.held_view(None)  # its rows are real tokens only
    batch, kv_heads, seq_len = layer.keys.shape[:3]
    available = real_token_mask(attention_mask, batch, seq_len, layer.keys.device)[:, None].expand(-1, kv_heads, -1)
    if isinstance(layer, CompressedLayer):
        return layer.held_view(available)
    return layer.keys, layer.values, available


def decoding_policy(press: BasePress) -> DecodingPress:
    """The DecodingPress whose policy the runtime drives for a press that compresses during decoding: the
    press itself, or a PrefillDecodingPress's `decoding_press`."""
    if isinstance(press, DecodingPress):
        return press
    if isinstance(press, PrefillDecodingPress):
        return press.decoding_press
    raise TypeError(
        f"{type(press).__name__} says it compresses during decoding, but the runtime drives only a DecodingPress "
        "or a PrefillDecodingPress."
    )


@dataclass
class DecodingRecompression:
    """The decoding-time state of one press session: per cache (dropped with it) and layer, the recent
    inputs the next compression scores with. kv_dtype: the block's press's (the layers it builds store rows
    in it; None: the model's dtype)."""

    press: DecodingPress
    kv_dtype: str | None = None
    recent: WeakKeyDictionary = field(default_factory=WeakKeyDictionary)

    def remember_context(self, cache, context: PrefillContext, new_context: bool) -> None:
        """A context prefill (or one chunk of it, new_context=False after the first) passed a layer."""
        layers = self.recent.setdefault(cache, {})
        if new_context or context.layer_idx not in layers:
            layers[context.layer_idx] = RecentInputs()
        layers[context.layer_idx].add(context.hidden_states, context.position_embeddings, self.press.hidden_states_buffer_size)

    def after_appended_tokens(self, module: nn.Module, cache, hidden_states: torch.Tensor, kwargs: dict, backend: str) -> None:
        """Tokens were appended behind the context in `module`'s layer (decode steps, question tokens)."""
        recent = self.recent.setdefault(cache, {}).setdefault(module.layer_idx, RecentInputs())
        recent.add(hidden_states, kwargs["position_embeddings"], self.press.hidden_states_buffer_size)
        recent.since_compression += hidden_states.shape[1]
        if recent.since_compression >= self.press.compression_interval:
            recent.since_compression = 0
            self.recompress_layer(module, cache, recent, kwargs.get("attention_mask"), backend)

    def recompress_layer(self, module: nn.Module, cache, recent: RecentInputs, attention_mask, backend: str) -> None:
        """Score everything layer `module.layer_idx` holds and keep each head's share of the target."""
        index = module.layer_idx
        layer = cache.layers[index]
        keys, values, available = held_view(layer, attention_mask)
        hidden_states, cos, sin = recent.last(self.press.hidden_states_buffer_size)
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
        keep = self.press.select(context)
        if torch.equal(keep, available):
            return  # within the target already
        if isinstance(layer, CompressedLayer):
            layer.keep_only(keep, slack=self.press.compression_interval)
        else:  # still dense: the first compression of this layer
            cache.layers[index] = make_compressed_layer(backend, keys, values, keep, module.config, self.kv_dtype)
