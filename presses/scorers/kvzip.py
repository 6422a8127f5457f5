"""KVzipPress: Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
arXiv 2505.23416."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from adakv.cache import checkpoint, restore
from adakv.flat.triton_decode import MAX_HEAD_DIM, triton_available
from adakv.models import cache_argument_name, queries

from ..base import BasePress, PrefillContext, WholePrefill
from ..scorer import ScorerPress
from .snapkv import float32_scores

DEFAULT_REPEAT_PROMPT = "\n\nRepeat the previous context:"  # the paper's prompt
# Upper bound of attention probabilities held at once while scoring (elements of float32).
SCORING_BLOCK_ELEMENTS = 1 << 26
# Reconstruction queries scored at once: smaller blocks skip more of the causal triangle, larger ones
# make fewer, larger matrix products.
SCORING_BLOCK_ROWS = 512


@dataclass
class KVzipPress(ScorerPress):
    """Scores each context KV pair by how much the model needs it to *reconstruct* the context.

    After the context prefill, the model reads `repeat_prompt` followed by the context tokens again, on
    top of the cached context. For every full-attention layer and KV head, a context key's score is the
    largest softmax attention it receives from any reconstruction query (the context's second copy)
    through any query head of its group; the softmax runs over all keys the query sees (the context and
    the reconstruction so far). No question is involved, so the compressed cache serves any question.

    The reconstruction runs `chunk_size` tokens per forward, each chunk attending to the context and to
    the earlier chunks, so chunking changes nothing but memory: each forward's attention probabilities
    are (chunk x keys) and are reduced blockwise. The reconstruction's keys/values stay in the cache while
    scoring (about as much again as the context) and are removed afterwards. The extra forwards, about
    one more prefill of the context, are the cost (README, "KVzip").

    KVzip needs the whole context in every layer, so it compresses after the whole prefill
    (`compresses_after_prefill`; chunked prefill is refused).

    budget_scope: how KVzipPress *alone* allocates its budget (inside a wrapper that allocates, such as
    AdaptivePress, ChunkKVPress or PerLayerCompressionPress, the wrapper decides and this field is not read).
    "model" (default; the paper's default, and kvpress's layerwise=False): one budget over every
    (layer, KV head) of the model, the sum of what a uniform selection would keep, allocated by these
    scores exactly as `AdaptivePress(KVzipPress(...), scope="model")` with its defaults does: each
    (layer, head) is first guaranteed its best alpha_safeguard=0.2 share of the mean budget (kvpress uses
    no such floor; `AdaptivePress(..., scope="model", alpha_safeguard=0)` drops it). "head": every head
    keeps its own best (1 - ratio) share (the evaluation's "kvzip", KVzip uniform; weaker: 0.38 against
    0.75 model-wide on the samples of issue 25). `compress(context)`, one layer on its own, is always the
    per-head selection, so wrappers that forward `compress` (ThinKPress, MergePress) get that one.

    repeat_prompt: text fed before the context copy, encoded with `tokenizer` (the pipeline and the
    evaluation attach theirs when it is None). repeat_prompt_ids: token ids used instead (no tokenizer needed).
    score: (batch, kv_heads, seq) float32 in [0, 1].
    """

    chunk_size: int = 2048
    repeat_prompt: str = DEFAULT_REPEAT_PROMPT
    repeat_prompt_ids: tuple[int, ...] | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    budget_scope: str = "model"

    BUDGET_SCOPES = ("model", "head")  # a class constant, not a field
    scores_are_probabilities = True  # attention probabilities

    def __post_init__(self):
        super().__post_init__()
        if self.budget_scope not in self.BUDGET_SCOPES:
            raise ValueError(
                f"budget_scope must be one of {self.BUDGET_SCOPES} ('model': one budget over every layer and "
                f"head, the paper's default; 'head': each head its own (1 - ratio) share), got {self.budget_scope!r}."
            )
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {self.chunk_size!r}.")
        if not isinstance(self.repeat_prompt, str):
            raise TypeError(f"repeat_prompt must be a str, got {type(self.repeat_prompt).__name__}.")
        if self.repeat_prompt_ids is not None:
            ids = self.repeat_prompt_ids
            if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise TypeError(f"repeat_prompt_ids must be a tuple of token ids (ints >= 0) or None, got {ids!r}.")
            self.repeat_prompt_ids = tuple(ids)

    @property
    def compresses_after_prefill(self) -> bool:
        return True

    def prompt_ids(self) -> tuple[int, ...]:
        if self.repeat_prompt_ids is not None:
            return self.repeat_prompt_ids
        if self.tokenizer is None:
            raise ValueError(
                "KVzipPress needs the model's tokenizer to encode its repeat prompt: "
                "KVzipPress(compression_ratio=..., tokenizer=tokenizer), or give repeat_prompt_ids. "
                "(The kv-press-text-generation pipeline and adakv-eval attach their tokenizer themselves.)"
            )
        return tuple(self.tokenizer(self.repeat_prompt, add_special_tokens=False).input_ids)

    def prepare_prefill(self, prefill: WholePrefill) -> None:
        prompt = self.prompt_ids()
        key = ("kvzip", self.chunk_size, prompt)
        if key not in prefill.memo:
            prefill.memo[key] = reconstruction_scores(prefill, prompt, self.chunk_size)
        self._scores = prefill.memo[key]

    def release_prefill(self) -> None:
        self.__dict__.pop("_scores", None)

    def compress_prefill(self, prefill: WholePrefill) -> list[torch.Tensor | None]:
        """KVzipPress alone: per `budget_scope`, one model-wide allocation (through AdaptivePress's own
        scope="model" selection, so the two agree exactly, tensor parallelism included) or per head."""
        if self.budget_scope == "head":
            return super().compress_prefill(prefill)
        from ..wrappers.adaptive import AdaptivePress  # scorers import no wrapper at module level

        return AdaptivePress(self, scope="model").compress_prefill(prefill)

    def score(self, context: PrefillContext) -> torch.Tensor:
        scores = self.__dict__.get("_scores")
        if scores is None:
            raise RuntimeError(
                "KVzipPress scores a whole prefill: use it as a press (`with press(model):`, the pipeline, the "
                "evaluation), which compresses after the context prefill, not by calling compress(context)."
            )
        layer_scores = scores[context.layer_idx]
        if layer_scores.shape[-1] != context.seq_len:
            raise ValueError(
                f"KVzipPress scored a context of {layer_scores.shape[-1]} tokens but is asked about {context.seq_len}: "
                "it cannot compress parts of a context (ChunkPress)."
            )
        return layer_scores


def attach_tokenizer(press: BasePress | None, tokenizer) -> None:
    """Give every KVzipPress in `press` that has neither a tokenizer nor prompt ids this tokenizer."""
    if press is None:
        return
    for part in press.press_tree():
        if isinstance(part, KVzipPress) and part.tokenizer is None and part.repeat_prompt_ids is None:
            part.tokenizer = tokenizer


@torch.no_grad()
def reconstruction_scores(prefill: WholePrefill, prompt_ids: tuple[int, ...], chunk_size: int) -> dict[int, torch.Tensor]:
    """{layer_idx: (batch, kv_heads, seq) float32}: the largest attention each context key receives
    from the reconstruction queries, fed `chunk_size` tokens at a time on top of `prefill.cache`, which is
    brought back to the context afterwards."""
    contexts = {context.layer_idx: context for context in prefill.contexts}
    first = prefill.contexts[0]
    if not all(bool(context.available.all()) for context in prefill.contexts):
        raise ValueError(
            "KVzipPress cannot score a padded batch (its reconstruction repeats each row's context): "
            "compress contexts of equal length, or one at a time."
        )
    context_length, decoder, cache = first.seq_len, prefill.decoder, prefill.cache
    context_embeds = prefill.embeddings()
    batch = context_embeds.shape[0]
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=context_embeds.device)
    prompt_embeds = decoder.get_input_embeddings()(prompt)[None].expand(batch, -1, -1).to(context_embeds.dtype)
    stream = torch.cat([prompt_embeds, context_embeds], dim=1)  # (batch, prompt + seq, hidden)
    scores = {index: c.keys.new_zeros(c.keys.shape[:3], dtype=torch.float32) for index, c in contexts.items()}
    chunk_start = [0]

    def score_chunk(module, args, kwargs, output) -> None:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        chunk_queries = queries(module, hidden_states, kwargs["position_embeddings"])
        keys = cache.layers[module.layer_idx].keys  # (batch, kv_heads, context + reconstruction so far, head_dim)
        update_max_attention(scores[module.layer_idx], chunk_queries, keys, module.scaling, context_length,
                             chunk_start[0], len(prompt_ids))

    saved = checkpoint(cache)
    handles = [c.module.register_forward_hook(score_chunk, with_kwargs=True) for c in contexts.values()]
    try:
        for start in range(0, stream.shape[1], chunk_size):
            chunk_start[0] = start
            decoder(inputs_embeds=stream[:, start : start + chunk_size], use_cache=True,
                    **{cache_argument_name(decoder): cache})
    finally:
        for handle in handles:
            handle.remove()
        restore(cache, saved)
        for index, context in contexts.items():  # drop the views into the longer reconstruction tensors
            cache.layers[index].keys, cache.layers[index].values = context.keys, context.values
    return scores


def update_max_attention(
    running_max: torch.Tensor, chunk_queries: torch.Tensor, keys: torch.Tensor, scaling: float,
    context_length: int, chunk_start: int, first_counted: int,
) -> None:
    """`torch_max_attention`'s update, by the Triton kernels of kvzip_kernels.py on CUDA (they hold no
    probabilities), by PyTorch elsewhere."""
    fused = (
        keys.is_cuda
        and triton_available()
        and chunk_queries.dtype == keys.dtype
        and keys.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and keys.shape[-1] <= MAX_HEAD_DIM
    )
    if not fused:
        torch_max_attention(running_max, chunk_queries, keys, scaling, context_length, chunk_start, first_counted)
        return
    from .kvzip_kernels import triton_max_attention

    unit_last_stride = [tensor if tensor.stride(-1) == 1 else tensor.contiguous() for tensor in (chunk_queries, keys)]
    triton_max_attention(running_max, *unit_last_stride, scaling, context_length, chunk_start, first_counted)


def torch_max_attention(
    running_max: torch.Tensor, chunk_queries: torch.Tensor, keys: torch.Tensor, scaling: float,
    context_length: int, chunk_start: int, first_counted: int,
) -> None:
    """running_max (batch, kv_heads, context_length) = max(running_max, attention of this chunk's counted
    queries to each context key, over query heads and queries).

    chunk_queries: (batch, heads, chunk, head_dim), the reconstruction stream's tokens
    [chunk_start, chunk_start + chunk); keys: (batch, kv_heads, context_length + chunk_start + chunk, head_dim).
    Query i of the stream sees the context and stream keys up to itself; queries before `first_counted`
    (the repeat prompt) are not counted. Rows go in blocks of at most SCORING_BLOCK_ROWS, each against
    only the keys its last row sees, so the causal triangle of the reconstruction is mostly skipped."""
    batch, heads, chunk, head_dim = chunk_queries.shape
    groups = heads // keys.shape[1]
    first_row = max(0, first_counted - chunk_start)  # the counted queries are a suffix of the stream
    seen_before = context_length + chunk_start  # keys every row of this chunk sees
    rows_per_block = min(SCORING_BLOCK_ROWS, max(1, SCORING_BLOCK_ELEMENTS // (keys.shape[2] * groups)))
    lowest = torch.finfo(torch.float32).min
    for start in range(first_row, chunk, rows_per_block):
        end = min(start + rows_per_block, chunk)
        # among the keys this block sees beyond seen_before, row i of the block sees the first start + i + 1
        stream_keys = torch.arange(end, device=keys.device)
        future = stream_keys[None, :] > torch.arange(start, end, device=keys.device)[:, None]  # (rows, end)
        for head in range(keys.shape[1]):
            block = chunk_queries[:, head * groups : (head + 1) * groups, start:end].reshape(batch, -1, head_dim)
            logits = float32_scores(block, keys[:, head, : seen_before + end].transpose(1, 2)).mul_(scaling)
            logits = logits.view(batch, groups, end - start, seen_before + end)
            logits[..., seen_before:].masked_fill_(future, lowest)
            probabilities = logits.softmax(dim=-1)[..., :context_length]  # (batch, groups, rows, context)
            best = probabilities.amax(dim=(1, 2))  # (batch, context)
            torch.maximum(running_max[:, head], best, out=running_max[:, head])
