"""Chunked context prefill that compresses every chunk as it arrives, so long contexts fit.

An ordinary context prefill runs the whole context through each layer at once: a press compresses
each layer right after its attention, so the dense keys/values of all layers never coexist, but the
full-sequence activations (the MLP intermediates above all) still grow with the context.
`prefill_in_chunks` feeds the context `chunk_size` tokens at a time instead, and after each layer's
attention on each chunk the press compresses *that chunk* on its own. Peak memory is then bounded by
one chunk's activations, and the cache grows only by the kept share of each chunk.

Semantics (an approximation of compressing after a full prefill, by design):

- Chunk i covers tokens [i * chunk_size, (i + 1) * chunk_size); positions continue across chunks.
- The first chunk is an ordinary context prefill. Every later chunk attends to the already
  *compressed* earlier chunks (per head, only their kept tokens) and to itself causally, so its keys,
  values and hidden states differ from those of a full prefill, which attends to every earlier token.
- The press compresses each chunk exactly as if the chunk were the whole context: its scores see the
  chunk's keys, values, hidden states and position embeddings only (a window press such as SnapKV
  uses the chunk's last queries; StreamingLLM keeps each chunk's first tokens as sinks) and it keeps
  (1 - ratio) of the chunk. Tokens of earlier chunks are never rescored.
- The kept tokens of every chunk join the compressed context: after the call each compressed layer
  holds sum_i kept(chunk_i) context tokens (per head for uniform presses, per layer for AdaptivePress),
  and `cache.get_seq_length()` is the context length. Question and decode tokens fed afterwards are
  never compressed, and rolling back (`cache.crop`, `adakv.rollback`, `checkpoint`/`restore`) to the
  end of the context works as after an ordinary prefill.
- Backend "mask" extends each layer's keep mask; backend "evict" folds each chunk's kept rows into the
  flat buffers and frees the rest before the next layer runs.
- With chunk_size >= the context length this is the ordinary prefill; with a press at ratio 0 (or
  press=None) it is a plain chunked prefill of the dense cache.

Attention masks: transformers builds one boolean mask of chunk x (all tokens so far) per forward,
which at long contexts outweighs the compressed cache (32k x 1M tokens = 32 GB). Once every layer of
the cache is compressed (no dense or sliding-window layer left), a chunk needs no mask: the compressed
layers hold no padding, and adakv's attention is causal over the appended chunk by itself (the masked
backend builds its own causal mask when given None). Those chunks therefore run under the attention
implementation "<current>_unmasked" (the same function, registered without a mask function, so
transformers passes mask=None); the others get transformers' mask as usual.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Generator

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from adakv.arguments import check_model, given, is_integer
from adakv.cache import ADAKV_ATTENTION_PREFIX, CompressedLayer
from adakv.models import cache_argument_name
from adakv.presses.base import BasePress

from .attention import set_attention_implementation
from .session import active_session


def prefill_in_chunks(
    model: PreTrainedModel,
    press: BasePress | None,
    input_ids: torch.Tensor,
    chunk_size: int,
    attention_mask: torch.Tensor | None = None,
    cache: Cache | None = None,
) -> Cache:
    """Prefill the context `input_ids` (batch, seq) into `cache` chunk by chunk, compressing each chunk.

    Call it inside `with press(model):` (the same press object) and keep using the returned cache
    inside that block, e.g. `model.generate(input_ids=torch.cat([input_ids, question], 1),
    past_key_values=cache)`. press=None runs a plain chunked prefill (the model must not be inside a
    press block then).

    chunk_size: tokens per forward (>= 1). attention_mask: (batch, seq) 1/0 for left-padded batches;
    each row's padding must end inside the first chunk (pads are never kept nor attended). Positions
    are then counted from each row's first real token, as `generate` does. cache: an empty transformers
    Cache to fill (default: a new DynamicCache). Returns the cache.

    See the module docstring for how this differs from compressing after a full prefill.
    """
    check_model(model, "prefill_in_chunks")
    chunk_size = check_chunk_size(chunk_size)
    check_input_ids(input_ids, vocab_size(model))
    check_press(model, press)
    cache = DynamicCache(config=model.config) if cache is None else cache
    check_empty_cache(cache)
    input_ids = input_ids.to(model.device)
    if attention_mask is not None:
        attention_mask = check_left_padding(attention_mask, input_ids, chunk_size).to(model.device)
    position_ids = positions(input_ids, attention_mask)
    cache_kwarg = {cache_argument_name(model): cache}
    receiving = active_session(model).receiving_context_chunks() if press is not None else nullcontext()
    with torch.no_grad(), receiving:
        for start in range(0, input_ids.shape[1], chunk_size):
            end = min(start + chunk_size, input_ids.shape[1])
            unmasked = every_layer_compressed(cache)
            with attention_without_mask(model) if unmasked else nullcontext():
                model(
                    input_ids=input_ids[:, start:end],
                    attention_mask=None if attention_mask is None or unmasked else attention_mask[:, :end],
                    position_ids=position_ids[:, start:end],
                    use_cache=True,
                    logits_to_keep=1,
                    **cache_kwarg,
                )
    return cache


UNMASKED_SUFFIX = "_unmasked"


def every_layer_compressed(cache: Cache) -> bool:
    """True when every cache layer holds a compressed context (so a chunk needs no attention mask)."""
    layers = getattr(cache, "layers", [])
    return bool(layers) and all(isinstance(layer, CompressedLayer) for layer in layers)


@contextmanager
def attention_without_mask(model: PreTrainedModel) -> Generator[None, None, None]:
    """Run the model under "<current>_unmasked": the current adakv attention function, registered with
    transformers' AttentionInterface but not with its mask interface, so no mask is built (mask=None)."""
    current = model.config._attn_implementation
    unmasked = current + UNMASKED_SUFFIX
    AttentionInterface.register(unmasked, ALL_ATTENTION_FUNCTIONS[current])
    set_attention_implementation(model, unmasked)
    try:
        yield
    finally:
        set_attention_implementation(model, current)


def positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq) position ids: 0, 1, ... from each row's first real token (pads get 0), as `generate`."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def check_chunk_size(chunk_size) -> int:
    if not is_integer(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}.")
    return int(chunk_size)


def vocab_size(model) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None)


def check_input_ids(input_ids, vocabulary: int | None = None) -> None:
    """A 2-D integer tensor of at least one token, every id in [0, vocabulary) when that is known."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = f"a {input_ids.dim()}-D tensor" if isinstance(input_ids, torch.Tensor) else given(input_ids)
        raise TypeError(f"input_ids must be a 2-D tensor of token ids (batch, seq), got {shape}.")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got a {input_ids.dtype} tensor.")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids is empty (shape {tuple(input_ids.shape)}): at least one token is needed "
            "(the context is empty?)."
        )
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or (vocabulary is not None and high >= vocabulary):
        raise ValueError(
            f"input_ids must be token ids in [0, {vocabulary if vocabulary is not None else 'vocabulary size'}) "
            f"(the model's vocabulary), got ids from {low} to {high}."
        )


def check_left_padding(attention_mask, input_ids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Allowed: left padding (each row 0...0 1...1) whose pads all lie in the first chunk."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must be a tensor of the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}."
        )
    mask = attention_mask.long()
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token).")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError(
            "prefill_in_chunks supports left padding only (each row of attention_mask is 0...0 1...1); "
            "this mask has padding after a real token."
        )
    if not mask.any(-1).all():
        raise ValueError(
            "A row of attention_mask is all padding (an empty context in the batch): at least one token is "
            "needed in every row."
        )
    pads = int((mask == 0).sum(-1).max())
    if pads >= chunk_size:
        raise ValueError(
            f"A row has {pads} padding tokens, but padding must end inside the first chunk "
            f"(chunk_size={chunk_size}): use chunk_size > {pads}, or batch contexts of closer lengths."
        )
    return attention_mask


def check_press(model: PreTrainedModel, press: BasePress | None) -> None:
    if press is None:
        if str(model.config._attn_implementation).startswith(ADAKV_ATTENTION_PREFIX):
            raise RuntimeError(
                "The model is inside a `with press(model):` block but press=None was passed: pass that press "
                "so each chunk is compressed, or run the plain chunked prefill outside the block."
            )
        return
    if not isinstance(press, BasePress):
        raise TypeError(f"press must be an adakv press (a BasePress instance) or None, got {type(press).__name__}.")
    for part in press.press_tree():
        if getattr(part, "refuses_chunked_prefill", None):  # e.g. presses that edit the cached context in place
            raise ValueError(f"{type(part).__name__} cannot run in a chunked prefill: {part.refuses_chunked_prefill}")
    if press.compresses_after_prefill:
        raise ValueError(
            f"{type(press).__name__} compresses after the whole context prefill (KVzipPress, or AdaptivePress with "
            'scope="model", need every layer at once), so it cannot compress a chunked prefill chunk by chunk. '
            "Prefill the context in one forward (prefill_chunk_size=None)."
        )
    session = active_session(model)
    if session is None or session.press is not press:
        raise RuntimeError(
            "prefill_in_chunks must run inside `with press(model):` with the same press object, e.g.\n"
            "    with press(model):\n"
            "        cache = prefill_in_chunks(model, press, input_ids, chunk_size)\n"
            "        model.generate(..., past_key_values=cache)"
        )


def check_empty_cache(cache) -> None:
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be a transformers Cache (e.g. DynamicCache()) or None, got {type(cache).__name__}.")
    if cache.get_seq_length() != 0:
        raise ValueError(
            f"cache already holds {cache.get_seq_length()} tokens; prefill_in_chunks fills an empty cache with "
            "a whole context. Feed later tokens (a question) as an ordinary forward or generate call."
        )
