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
(KeyRerotationPress) cannot leak into the next setting. A scoring press's scores do not depend on its ratio
either (`ScorerPress.score_memo_key`): they are computed once per prefill and layer and reused by every
setting of the same scorer (`DensePrefill.memo` again), e.g. SnapKV's by snapkv, adakv_snapkv and
adakv_model_snapkv at every ratio.

Batched answers (`batched_fast_answers`): every setting of one sample whose cache is all flat layers (backend
"evict", no compression during decoding) is compressed as `fast_answer` compresses it, then all of them are
answered from one cache stacking them as batch rows (`adakv.cache.stacked_cache`, each row with its own per-head
lengths) in one greedy decode (`answers_from_stacked_cache`): one question prefill, one CUDA-graph capture and
one decode step per token for all of them, instead of one of each per setting. Every row attends to its own
rows only and its tokens are its own argmax, so its answer is the one it would get alone (exactly so in
float32 on CPU, tests/test_batched_answers.py; on a GPU the batched products may round differently in bf16,
so the switch is part of a run's config, as `--cuda-graphs` is).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache

from adakv.cache import BackendFallbackWarning, stacked_cache, stacking_refusal
from adakv.models import cache_argument_name
from adakv.pipeline import answer_from_cache, encode_prompt_parts, prefill_context, split_prompt
from adakv.pipeline.text_generation import stop_token_ids
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
    # the memo also reaches presses that compress layer by layer: their scores are shared across ratios
    contexts = [replace(context, keys=context.keys.clone(), values=context.values.clone(), memo=dense.memo)
                for context in dense.contexts]
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


BATCH_LIMIT = 64  # settings answered in one batched decode at most (more are split into several)


def batch_refusal(press: BasePress | None, model) -> str | None:
    """Why the answer under `press` cannot join a batched decode, or None when it can: the uncompressed model
    keeps dense layers, backend "mask" keeps dense rows, and a press that compresses during decoding acts on
    every step of its own answer."""
    if press is None:
        return "the uncompressed model keeps dense layers"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackendFallbackWarning)
        backend = block_backend(press, model.config)
    if backend != "evict":
        return f"{type(press).__name__} runs with backend {backend!r} on this model, whose layers do not stack"
    if press.compresses_during_decoding:
        return f"{type(press).__name__} compresses during decoding, on every step of its own answer"
    return None


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def answers_from_stacked_cache(model, tokenizer, cache, question_ids: torch.Tensor, max_new_tokens: int) -> list[str]:
    """`answer_from_cache` for every batch row of `cache` at once (a cache of `stacked_cache`): the question (1, n)
    after each row's context, then greedy tokens until each row's end-of-sequence token or `max_new_tokens`
    steps, one forward per step for all rows. A row that has stopped keeps decoding (its own rows only, ignored)
    until every row stopped. The cache is left with the question and answers appended (it is not rolled back)."""
    rows = cache.layers[0].batch_size
    stop_ids = stop_token_ids(model, tokenizer)
    device = model.device
    kwarg = {cache_argument_name(model): cache}
    next_input = question_ids.to(device).expand(rows, -1).contiguous()
    position = cache.get_seq_length()
    answers: list[list[int]] = [[] for _ in range(rows)]
    running = list(range(rows))
    for _ in range(max_new_tokens):
        positions = torch.arange(position, position + next_input.shape[1], device=device)[None].expand(rows, -1)
        logits = model(input_ids=next_input, position_ids=positions, use_cache=True, logits_to_keep=1, **kwarg).logits
        tokens = logits[:, -1].argmax(-1)
        chosen = tokens.tolist()
        still = []
        for row in running:
            if chosen[row] not in stop_ids:
                answers[row].append(chosen[row])
                still.append(row)
        running = still
        if not running:
            break
        position += next_input.shape[1]
        next_input = tokens[:, None]
    return [tokenizer.decode(answer, skip_special_tokens=True).strip() for answer in answers]


def batched_fast_answers(
    model, tokenizer, dense: DensePrefill, presses: list[BasePress], question_ids, max_new_tokens: int,
    cuda_graphs: bool | str = False, fused: bool = False,
) -> tuple[list[str | None], list[float], float]:
    """Answers from `dense` compressed by each of `presses` (each with `batch_refusal` None), in batched decodes
    of up to BATCH_LIMIT settings. Each press compresses inside its own block within one
    `accelerate(model, cuda_graphs, fusions)` block, as `fast_answer` compresses it (the same switches are on);
    the stacked cache is answered inside a RecordingPress block (which compresses nothing) in the same
    acceleration. Returns (answers, compression seconds per press, seconds of the batched decodes); an answer is
    None where the press left a layer uncompressed (a cache that does not stack): answer it with `fast_answer`."""
    device = next(model.parameters()).device
    fusions = dict(join_projections=fused, fuse_elementwise=fused)
    answers: list[str | None] = [None] * len(presses)
    seconds: list[float] = []
    with accelerate(model, cuda_graphs=cuda_graphs, **fusions):
        caches = []
        for press in presses:
            attach_tokenizer(press, tokenizer)
            _synchronize(device)
            start = time.perf_counter()
            with press(model):
                caches.append(compressed_cache(dense, press))
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
        stackable = [index for index, cache in enumerate(caches) if stacking_refusal(cache) is None]
        _synchronize(device)
        start = time.perf_counter()
        for first in range(0, len(stackable), BATCH_LIMIT):
            chunk = stackable[first:first + BATCH_LIMIT]
            stack = stacked_cache([caches[index] for index in chunk])
            for index in chunk:
                caches[index] = None  # each setting's own cache is freed once its rows are in the stack
            with RecordingPress()(model):
                texts = answers_from_stacked_cache(model, tokenizer, stack, question_ids, max_new_tokens)
            del stack
            for index, text in zip(chunk, texts):
                answers[index] = text
        _synchronize(device)
    return answers, seconds, time.perf_counter() - start
