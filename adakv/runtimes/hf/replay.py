"""A press's replay of a prefilled context (KVzip's reconstruction): `CacheReplay`, the transformers
runtime's `ContextReplay`.

The replay feeds a stream of embeddings (KVzip: the repeat prompt, then the context again) through the
model behind the dense cache of the context, `chunk_size` tokens at a time, with the press's `attend` as
the attention of every recorded (compressed) layer (attention.py's "adakv_replay_<base>" implementation
routes it). Nothing after the last recorded layer's attention reads its output, so each of its forwards
stops there (`_ReplayedLastLayer`).

Order. When every decoder layer is a recorded full-attention layer and the decoder is the plain kind
(`layer_by_layer_decoder`: `layers` and one `rotary_emb`), the replay runs *layer by layer*: all chunks
through layer 0, then all through layer 1, ... Each (layer, chunk) sees the same cache and inputs as in
the chunk-by-chunk order (the layer's keys of the context and of the earlier chunks), so the results are
the same, but only one layer's replayed keys and values exist at a time: they are dropped as soon as the
layer's last chunk is scored. What the replay holds beyond the dense cache is then the stream's hidden
states (twice: a layer's inputs and outputs) and one layer's replayed keys/values, instead of a second
copy of every layer's cache. Other decoders (sliding-window layers, per-layer rotary tables: Gemma3) run
chunk by chunk through the decoder's own forward, holding every layer's replayed keys until the end.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache

from adakv.cache import ADAKV_ATTENTION_PREFIX, checkpoint, restore
from adakv.models import SUPPORTED_ATTENTION_IMPLEMENTATIONS, cache_argument_name
from adakv.presses.base import PrefillContext

from . import active
from .attention import REPLAY_ATTRIBUTE, REPLAY_PREFIX, register_attention_functions, set_attention_implementation


class _ReplayedLastLayer(Exception):
    """Raised by the replay's attention of the last recorded layer to end that forward early."""


class CacheReplay:
    """`ContextReplay` over a transformers cache: runs the model's decoder again behind a prefilled context
    (KVzip's reconstruction) and brings the cache back to the context afterwards."""

    def __init__(self, decoder: nn.Module, cache: Cache, contexts: list[PrefillContext], input_ids=None, inputs_embeds=None):
        self.decoder, self.cache, self.contexts = decoder, cache, contexts
        self.input_ids, self.inputs_embeds = input_ids, inputs_embeds

    def context_embeddings(self) -> torch.Tensor:
        if self.inputs_embeds is not None:
            return self.inputs_embeds
        if self.input_ids is None:
            raise ValueError("This prefill has neither input_ids nor inputs_embeds.")
        return self.decoder.get_input_embeddings()(self.input_ids)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(token_ids)

    def replay(self, stream: torch.Tensor, chunk_size: int, attend: Callable) -> None:
        """Feed `stream` (batch, n, hidden) through the decoder behind the context, `chunk_size` tokens per
        forward, with `attend` as the attention of every recorded layer (ContextReplay's contract), layer by
        layer where the decoder allows it (see the module docstring)."""
        chunks = [stream[:, start : start + chunk_size] for start in range(0, stream.shape[1], chunk_size)]
        starts = [index * chunk_size for index in range(len(chunks))]
        del stream  # the chunks are views; after the first layer only its outputs hold memory
        chunk_start = [0]
        last = max(context.layer_idx for context in self.contexts)

        def layer_attention(layer_idx: int) -> Callable:
            def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
                output = attend(layer_idx, query, key, value, chunk_start[0], layer_idx != last)
                if layer_idx == last:
                    raise _ReplayedLastLayer
                return output

            return attention

        saved = checkpoint(self.cache)
        original = self.decoder.config._attn_implementation
        register_attention_functions()
        set_attention_implementation(self.decoder, REPLAY_PREFIX + replay_base(original))
        for context in self.contexts:
            setattr(context.module, REPLAY_ATTRIBUTE, layer_attention(context.layer_idx))
        session = active.session_of(self.decoder)
        try:
            with session.running_own_forwards() if session is not None else ExitStack():
                if layer_by_layer_decoder(self.decoder, self.contexts):
                    self._layer_by_layer(chunks, starts, chunk_start)
                else:
                    self._chunk_by_chunk(chunks, starts, chunk_start)
        finally:
            for context in self.contexts:
                delattr(context.module, REPLAY_ATTRIBUTE)
            set_attention_implementation(self.decoder, original)
            restore(self.cache, saved)
            for context in self.contexts:
                self._drop_replayed(context)

    def _drop_replayed(self, context: PrefillContext) -> None:
        """Point the layer back at the context's own tensors, freeing the longer replayed ones."""
        self.cache.layers[context.layer_idx].keys = context.keys
        self.cache.layers[context.layer_idx].values = context.values

    def _chunk_by_chunk(self, chunks: list[torch.Tensor], starts: list[int], chunk_start: list[int]) -> None:
        """Each chunk through the decoder's own forward."""
        for start, chunk in zip(starts, chunks):
            chunk_start[0] = start
            try:
                self.decoder(inputs_embeds=chunk, use_cache=True, **{cache_argument_name(self.decoder): self.cache})
            except _ReplayedLastLayer:
                pass

    def _layer_by_layer(self, chunks: list[torch.Tensor], starts: list[int], chunk_start: list[int]) -> None:
        """Every chunk through one decoder layer before the next layer; each layer's replayed keys/values are
        dropped once its last chunk has passed. chunks: (batch, chunk, hidden) each."""
        decoder, length = self.decoder, self.cache.get_seq_length()
        cache_kwarg = {cache_argument_name(decoder): self.cache}
        positions = [torch.arange(length + s, length + s + c.shape[1], device=c.device)[None] for s, c in zip(starts, chunks)]
        rotary = [decoder.rotary_emb(chunk, position_ids) for chunk, position_ids in zip(chunks, positions)]
        contexts = {context.layer_idx: context for context in self.contexts}
        hidden = list(chunks)
        chunks.clear()  # the stream's storage goes with the first layer's inputs
        for layer in decoder.layers[: decoder.config.num_hidden_layers]:
            outputs = []
            for start, states, position_ids, embeddings in zip(starts, hidden, positions, rotary):
                chunk_start[0] = start
                try:
                    outputs.append(layer(states, attention_mask=None, position_ids=position_ids,
                                         position_embeddings=embeddings, use_cache=True, **cache_kwarg))  # fmt: skip
                except _ReplayedLastLayer:
                    outputs.append(None)
            hidden = outputs
            self._drop_replayed(contexts[layer.self_attn.layer_idx])
            if outputs[-1] is None:  # the last recorded layer: nothing after it is read
                return


def layer_by_layer_decoder(decoder: nn.Module, contexts: list[PrefillContext]) -> bool:
    """Whether the replay may run `decoder` layer by layer: every decoder layer's attention is recorded
    (full attention, so its mask is the replay's own causal rule and the layer reads no other mask) and
    the decoder has one rotary table (`rotary_emb`) for all layers."""
    layers = getattr(decoder, "layers", None)
    if layers is None or not isinstance(getattr(decoder, "rotary_emb", None), nn.Module):
        return False
    recorded = {id(context.module) for context in contexts}
    layers = list(layers)[: decoder.config.num_hidden_layers]
    return all(id(getattr(layer, "self_attn", None)) in recorded for layer in layers) and len(layers) == len(contexts)


def replay_base(implementation: str) -> str:
    """The model's own attention implementation ("sdpa" or "eager") under a press block's adakv twin."""
    base = implementation.removeprefix(ADAKV_ATTENTION_PREFIX)
    if base not in SUPPORTED_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"A context replay runs over sdpa or eager attention, not {implementation!r}.")
    return base
