"""Answering one sample under one press: the naive loop and the one-prefill fast path.

Naive: for every (press, ratio), prefill the context inside `with press(model):` (each layer is
compressed right after its own attention ran) and answer the question from the compressed cache.

Fast: every layer is compressed *after* its attention ran on the full context, so the prefill's
hidden states, keys and values never depend on the press. `dense_prefill` runs the context once
with `RecordingPress`, which keeps each full-attention layer's `PrefillContext` (built by
the runtime's session itself) and compresses nothing; `fast_answer` then builds each setting's cache by
calling the runtime's `compressed_layer(press, context)` on copies of those contexts, in layer order,
exactly as the hooks would, and answers. Presses that compress after the whole prefill (`compresses_after_prefill`:
AdaptivePress(scope="model"), KVzipPress) get all recorded contexts at once through
`compressed_layers_after_prefill`, as their decoder hook would; KVzip's scores, which do not depend on
the ratio, are computed once per prefill and reused (`DensePrefill.memo`). Keys and values are cloned per setting, so presses that edit keys in place
(KeyRerotationPress) cannot leak into the next setting.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache

from adakv.cache import BackendFallbackWarning
from adakv.pipeline import answer_from_cache, encode_prompt_parts, prefill_context, split_prompt
from adakv.presses import BasePress, PrefillContext, RecordingPress
from adakv.presses.scorers.kvzip import attach_tokenizer
from adakv.runtimes.hf import accelerate, block_backend, compressed_layer, compressed_layers_after_prefill, whole_prefill
from adakv.runtimes.hf.graph_decode import graph_decoding_refusal


@dataclass
class DensePrefill:
    """The dense cache of one context, the recorded per-layer contexts, and what whole-prefill presses
    need besides (the decoder, the context ids, and a memo of scores shared across settings)."""

    cache: DynamicCache
    contexts: list[PrefillContext]
    decoder: torch.nn.Module | None = None
    input_ids: torch.Tensor | None = None
    memo: dict = field(default_factory=dict)


def encode_prompt(tokenizer, sample, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(context_ids, question_ids), each (1, n) on `device`, split as the pipeline splits prompts."""
    context_text, question_text = split_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix)
    context_ids, (question_ids,) = encode_prompt_parts(tokenizer, context_text, [question_text])
    return context_ids.to(device), question_ids.to(device)


@torch.no_grad()
def prefill(model, context_ids: torch.Tensor) -> DynamicCache:
    """Prefill the context into a fresh cache (compressed by the press whose block is active, if any)."""
    cache = DynamicCache(config=model.config)
    prefill_context(model, cache, context_ids)
    return cache


def active(press: BasePress | None, model, cuda_graphs: bool | str = False, fused: bool = False):
    """`press(model)`, or the model as it is when there is no press. With `cuda_graphs` the answers decode
    from CUDA graphs when the press allows it (backend evict, no per-step hook), eagerly otherwise. With
    `fused` every forward in the block joins q/k/v and gate/up and fuses the element-wise work
    (adakv.accelerate), with or without a press."""
    fusions = dict(join_projections=fused, fuse_elementwise=fused)
    if press is None:
        return accelerate(model, **fusions)
    if cuda_graphs:
        with warnings.catch_warnings():  # the block itself warns once about a backend fallback
            warnings.simplefilter("ignore", BackendFallbackWarning)
            backend = block_backend(press, model.config)
        if graph_decoding_refusal(press, backend) is None:
            return press(model, cuda_graphs=cuda_graphs, **fusions)
    return press(model, **fusions)


def naive_answer(
    model, tokenizer, press, context_ids, question_ids, max_new_tokens: int, cuda_graphs: bool | str = False,
    fused: bool = False,
) -> tuple[str, DynamicCache]:
    """Prefill with `press` active (None: dense) and answer."""
    attach_tokenizer(press, tokenizer)
    with active(press, model, cuda_graphs, fused):
        cache = prefill(model, context_ids)
        return answer_from_cache(model, tokenizer, cache, question_ids, max_new_tokens), cache


def dense_prefill(model, context_ids: torch.Tensor) -> DensePrefill:
    """Prefill once without compression, recording each full-attention layer's PrefillContext."""
    recorder = RecordingPress()
    with recorder(model):
        cache = prefill(model, context_ids)
    return DensePrefill(cache, recorder.contexts, model.get_decoder(), context_ids)


def compressed_cache(dense: DensePrefill, press: BasePress | None) -> DynamicCache:
    """A new cache holding `dense`'s context as `press` would have compressed it during prefill."""
    cache = copy.copy(dense.cache)
    cache.layers = [copy.copy(layer) for layer in dense.cache.layers]
    if press is None:
        return cache
    contexts = [replace(context, keys=context.keys.clone(), values=context.values.clone()) for context in dense.contexts]
    if press.compresses_after_prefill:
        prefill = whole_prefill(contexts, cache, dense.decoder, input_ids=dense.input_ids, memo=dense.memo)
        layers = compressed_layers_after_prefill(press, prefill)
    else:
        layers = [compressed_layer(press, context) for context in contexts]
    for context, layer in zip(contexts, layers):
        if layer is not None:
            cache.layers[context.layer_idx] = layer
    return cache


def fast_answer(
    model, tokenizer, dense: DensePrefill, press, question_ids, max_new_tokens: int, cuda_graphs: bool | str = False,
    fused: bool = False,
) -> tuple[str, DynamicCache]:
    """Answer from `dense` compressed by `press` (None: dense), without a new prefill."""
    attach_tokenizer(press, tokenizer)
    with active(press, model, cuda_graphs, fused):
        cache = compressed_cache(dense, press)
        return answer_from_cache(model, tokenizer, cache, question_ids, max_new_tokens), cache
