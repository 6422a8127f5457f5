"""KVzipPress: Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
arXiv 2505.23416."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from adakv.kernels.kvzip_reference import attend_and_score

from ..base import BasePress, PrefillContext, WholePrefill
from ..fields import Integer, OneOf, Text, Tokenizer, TokenIds
from ..scorer import ScorerPress

DEFAULT_REPEAT_PROMPT = "\n\nRepeat the previous context:"  # the paper's prompt


@dataclass
class KVzipPress(ScorerPress):
    """Scores each context KV pair by how much the model needs it to *reconstruct* the context.

    After the context prefill, the model reads `repeat_prompt` followed by the context tokens again, on
    top of the cached context. For every full-attention layer and KV head, a context key's score is the
    largest softmax attention it receives from any reconstruction query (the context's second copy)
    through any query head of its group; the softmax runs over all keys the query sees (the context and
    the reconstruction so far). No question is involved, so the compressed cache serves any question.

    The reconstruction runs `chunk_size` tokens per forward, each chunk attending to the context and to
    the earlier chunks, so chunking changes nothing but memory. The scoring happens inside the
    reconstruction's attention (`attend_and_score`: one softmax gives the output and the scores; no query
    is recomputed), the last scored layer's output is never computed, and where the decoder allows it the
    reconstruction runs layer by layer, so only one layer's reconstruction keys/values exist at a time
    (adakv/runtimes/hf/replay.py); the context's hidden states are not held (`reads_hidden_states`). The
    extra forwards cost more than one prefill: each reconstruction query attends to the whole context and
    the reconstruction so far (benchmarks/bench_kvzip_cost.py, docs/RESULTS.md "KVzip: compress once").

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
    scores_memoizable = False  # `score` already reads the prefill's memo (`prepare_prefill` fills it once)
    reads_hidden_states = False  # the reconstruction makes its own queries: the context's hidden states are not held

    field_rules = {
        "tokenizer": Tokenizer(),
        "chunk_size": Integer(1),
        "repeat_prompt": Text(),
        "repeat_prompt_ids": TokenIds(),
        "budget_scope": OneOf(
            BUDGET_SCOPES,
            note=" ('model': one budget over every layer and head, the paper's default; 'head': each head its own "
            "(1 - ratio) share)",
        ),
    }

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
        key = self.memo_key()
        if key not in prefill.memo:
            prefill.memo[key] = reconstruction_scores(prefill, key[2], self.chunk_size)

    def memo_key(self) -> tuple:
        """Where this press's scores of a prefill are kept in its memo (they do not depend on the ratio)."""
        return ("kvzip", self.chunk_size, self.prompt_ids())

    def compress_prefill(self, prefill: WholePrefill) -> list[torch.Tensor | None]:
        """KVzipPress alone: per `budget_scope`, one model-wide allocation (through AdaptivePress's own
        scope="model" selection, so the two agree exactly, tensor parallelism included) or per head."""
        if self.budget_scope == "head":
            return super().compress_prefill(prefill)
        from ..wrappers.adaptive import AdaptivePress  # scorers import no wrapper at module level

        return AdaptivePress(self, scope="model").compress_prefill(prefill)

    def score(self, context: PrefillContext) -> torch.Tensor:
        scores = None if context.memo is None else context.memo.get(self.memo_key())
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
    """{layer_idx: (batch, kv_heads, seq) float32}: the largest attention each context key receives from the
    reconstruction queries (the repeat prompt, then the context again), replayed `chunk_size` tokens at a time
    behind the context by the runtime (`prefill.replay`). Each compressed layer's attention in the replay is
    `attend_and_score`: the chunk's attention output and its scores from one softmax."""
    if prefill.replay is None:
        raise ValueError("KVzipPress needs a runtime that can run the model again over the context (WholePrefill.replay).")
    if not all(bool(context.available.all()) for context in prefill.contexts):
        raise ValueError(
            "KVzipPress cannot score a padded batch (its reconstruction repeats each row's context): "
            "compress contexts of equal length, or one at a time."
        )
    contexts = {context.layer_idx: context for context in prefill.contexts}
    if any(getattr(c.module.config, "attn_logit_softcapping", None) for c in prefill.contexts):
        raise ValueError("KVzipPress's reconstruction attention does not apply attention-logit softcapping (this model's).")
    context_length = prefill.contexts[0].seq_len
    scores = {index: c.keys.new_zeros(c.keys.shape[:3], dtype=torch.float32) for index, c in contexts.items()}

    def attend(layer_idx, chunk_queries, keys, values, chunk_start: int, output_needed: bool) -> torch.Tensor | None:
        scaling = contexts[layer_idx].module.scaling
        return attend_and_score(
            scores[layer_idx], chunk_queries, keys, values, scaling, context_length, chunk_start, len(prompt_ids),
            output_needed,
        )

    prefill.replay.replay(reconstruction_stream(prefill, prompt_ids), chunk_size, attend)  # no reference kept here
    return scores


def reconstruction_stream(prefill: WholePrefill, prompt_ids: tuple[int, ...]) -> torch.Tensor:
    """(batch, prompt + seq, hidden): the repeat prompt's embeddings, then the context's."""
    context_embeds = prefill.replay.context_embeddings()
    batch = context_embeds.shape[0]
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=context_embeds.device)
    prompt_embeds = prefill.replay.embed(prompt)[None].expand(batch, -1, -1).to(context_embeds.dtype)
    return torch.cat([prompt_embeds, context_embeds], dim=1)
