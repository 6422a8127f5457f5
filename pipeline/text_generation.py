"""The "kv-press-text-generation" pipeline: compress a context once, answer questions from it.

    import adakv  # registers the pipeline
    from transformers import pipeline
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    pipe(context, question="...", press=SnapKVPress(compression_ratio=0.5))  # {"answer": "..."}

The prompt is split in two: the context part (chat-template prefix + context) is prefilled and
compressed once, without seeing any question (query-agnostic compression); each question part
(question + template suffix + answer prefix) is then fed on top of the compressed cache, answered
greedily, and rolled back, so every question sees the same compressed context.

With `prefill_chunk_size=N` the context is prefilled N tokens at a time and the press compresses
each chunk as it arrives (adakv.prefill_in_chunks), so contexts far longer than an ordinary prefill
allows fit in memory; later chunks then attend to the compressed earlier ones (an approximation).

The functions `split_prompt`, `prefill_context` and `answer_from_cache` are the building blocks; the
evaluation runner reuses them.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Pipeline
from transformers.cache_utils import Cache, DynamicCache
from transformers.pipelines import PIPELINE_REGISTRY

from adakv.arguments import ArgumentTypeError, given, is_integer
from adakv.cache import checkpoint, restore
from adakv.runtimes.hf.chunked_prefill import check_input_ids, prefill_in_chunks
from adakv.runtimes.hf import accelerate
from adakv.runtimes.hf.acceleration import check_speed_switches
from adakv.runtimes.hf.refusals import cache_refusal
from adakv.models import cache_argument_name
from adakv.presses.base import BasePress
from adakv.presses.scorers.kvzip import attach_tokenizer

TASK = "kv-press-text-generation"
QUESTION_SEPARATOR = "\n\n"  # between the context and the question inside the prompt


def split_prompt(tokenizer, context: str, question: str = "", answer_prefix: str = "") -> tuple[str, str]:
    """Split the prompt into (context_text, question_text); their concatenation is the full prompt.

    With a chat template, the prompt is one user turn whose content is
    `context + QUESTION_SEPARATOR + question`, followed by the generation prompt and `answer_prefix`;
    context_text ends right after the context. Without a template the prompt is the plain
    concatenation `context`, `QUESTION_SEPARATOR + question + answer_prefix`. The separator is left
    out when the question is empty."""
    question_part = QUESTION_SEPARATOR + question if question else ""
    if getattr(tokenizer, "chat_template", None) is None:
        return context, question_part + answer_prefix
    content = context + question_part
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    start, kept_context = prompt.rfind(content), context
    if start < 0:  # the template trimmed the content's outer whitespace
        start, kept_context = prompt.rfind(content.strip()), context.lstrip()
    if start < 0:
        raise ValueError("The tokenizer's chat template rewrites the message content; cannot locate the context in it.")
    context_end = start + len(kept_context)
    return prompt[:context_end], prompt[context_end:] + answer_prefix


def encode_prompt_parts(tokenizer, context_text: str, question_texts: list[str]):
    """Token ids (1, n) of the context part and of each question part.

    Special tokens (BOS) are added only when there is no chat template (a template writes its own)
    and only to the context part."""
    add_special = getattr(tokenizer, "chat_template", None) is None
    context_ids = tokenizer(context_text, add_special_tokens=add_special, return_tensors="pt").input_ids
    question_ids = [
        tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids for text in question_texts
    ]
    return context_ids, question_ids


def truncate_context(tokenizer, context: str, max_context_length: int | None) -> str:
    """Keep the first `max_context_length` tokens of the raw context (template and question not counted)."""
    if max_context_length is None:
        return context
    ids = tokenizer(context, add_special_tokens=False).input_ids
    if len(ids) <= max_context_length:
        return context
    return tokenizer.decode(ids[:max_context_length])


def prefill_context(
    model, cache: Cache, context_ids: torch.Tensor, press: BasePress | None = None, chunk_size: int | None = None
) -> None:
    """Run the context through the model into `cache` (empty before). Inside `with press(model):`
    this is the forward whose keys/values the press compresses.

    chunk_size: None runs the context in one forward; an int runs it in chunks of that many tokens,
    each compressed as it arrives by `press` (which must then be the active press, or None for a plain
    chunked prefill), see adakv.prefill_in_chunks."""
    check_input_ids(context_ids)  # an empty context: at least one token is needed
    if chunk_size is not None:
        prefill_in_chunks(model, press, context_ids, chunk_size, cache=cache)
        return
    model(input_ids=context_ids, use_cache=True, logits_to_keep=1, **{cache_argument_name(model): cache})


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids from the model's generation config and the tokenizer."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.add(tokenizer.eos_token_id)
    ids.discard(None)
    return ids


@torch.no_grad()
def answer_from_cache(model, tokenizer, cache: Cache, question_ids: torch.Tensor, max_new_tokens: int) -> str:
    """Feed `question_ids` (1, n) after the cached context, decode greedily up to `max_new_tokens`
    tokens or an end-of-sequence token, then roll the cache back to the context.

    Returns the decoded answer without special tokens, stripped. The cache may hold a compressed
    context: call this inside the `with press(model):` block that compressed it."""
    if question_ids.shape[0] != 1:
        raise ValueError(f"answer_from_cache decodes one sequence at a time, got a batch of {question_ids.shape[0]}.")
    saved = checkpoint(cache)
    context_length = saved.seq_len
    stop_ids = stop_token_ids(model, tokenizer)
    cache_kwarg = {cache_argument_name(model): cache}
    next_input, position, answer = question_ids.to(model.device), context_length, []
    try:
        for _ in range(max_new_tokens):
            positions = torch.arange(position, position + next_input.shape[1], device=model.device)[None]
            logits = model(
                input_ids=next_input, position_ids=positions, use_cache=True, logits_to_keep=1, **cache_kwarg
            ).logits
            token = int(logits[0, -1].argmax())
            if token in stop_ids:
                break
            answer.append(token)
            position += next_input.shape[1]
            next_input = torch.tensor([[token]], device=model.device)
    finally:
        restore(cache, saved)
    return tokenizer.decode(answer, skip_special_tokens=True).strip()


def check_positive_integer(name: str, value, optional: bool = False) -> None:
    if (value is None and optional) or (is_integer(value) and value >= 1):
        return
    allowed = "a positive int" + (" or None" if optional else "")
    error = ValueError if is_integer(value) else ArgumentTypeError
    raise error(f"{name} must be {allowed}, got {given(value)}.")


def check_pipeline_inputs(
    context, question, questions, press, max_new_tokens, max_context_length, cache, prefill_chunk_size=None,
    answer_prefix="",
) -> list[str]:
    """Validate the pipeline's arguments; return the list of questions to answer."""
    if not isinstance(context, str):
        raise TypeError(f"context must be a str, got {type(context).__name__}.")
    if not context.strip():
        raise ValueError("context is empty: at least one token is needed; pass the text to compress (a non-empty str).")
    if question is not None and questions is not None:
        raise ValueError("Pass either `question` (one str) or `questions` (a list of str), not both.")
    if questions is not None:
        if not isinstance(questions, list) or not all(isinstance(item, str) for item in questions):
            raise TypeError(f"questions must be a list of str, got {given(questions)}.")
        if not questions:
            raise ValueError("questions is an empty list: pass at least one question.")
    elif question is not None and not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}.")
    if not isinstance(answer_prefix, str):
        raise TypeError(f"answer_prefix must be a str (the text the answer starts with), got {given(answer_prefix)}.")
    if press is not None and not isinstance(press, BasePress):
        raise TypeError(f"press must be an adakv press (a BasePress instance such as SnapKVPress) or None, got {type(press).__name__}.")
    check_positive_integer("max_new_tokens", max_new_tokens)
    check_positive_integer("max_context_length", max_context_length, optional=True)
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(f"cache must be a transformers Cache (e.g. DynamicCache()) or None, got {type(cache).__name__}.")
    if cache is not None and press is not None and cache_refusal(cache, type(press).__name__) is not None:
        raise ValueError(f"cache: {cache_refusal(cache, type(press).__name__)}")
    if cache is not None and cache.get_seq_length() != 0:
        raise ValueError("cache must be empty: the pipeline fills it with the (compressed) context.")
    chunk = prefill_chunk_size
    if chunk is not None and not (is_integer(chunk) and chunk >= 1):
        raise ValueError(f"prefill_chunk_size must be None or an integer >= 1, got {chunk!r}.")
    return questions if questions is not None else [question or ""]


class KVPressTextGenerationPipeline(Pipeline):
    """Answer one question (`question=`) or several (`questions=[...]`) about `context`, from a KV
    cache compressed once by `press`.

    Arguments of a call:
      context: the text to compress (str, not empty).
      question / questions: one str -> returns {"answer": str}; a list of str -> {"answers": [str]}.
        Neither: the model continues the context (answer to an empty question).
      answer_prefix: text the answer starts with (after the generation prompt), e.g. "Answer:".
      press: an adakv press, or None for no compression. Its kv_dtype (e.g.
        `SnapKVPress(0.5, kv_dtype="float8_e4m3fn")`) sets the dtype the compressed context is stored in.
      max_new_tokens: upper bound of each answer's length (default 50).
      max_context_length: keep only the first this many tokens of the context (default: all).
      cache: a transformers Cache to fill (default: a new DynamicCache); after the call it holds
        the compressed context, e.g. for `adakv.kept_token_counts(cache)`.
      cuda_graphs: True replays the answers' decode steps from a CUDA graph (press with backend "evict",
        model on CUDA; see adakv/runtimes/hf/graph_decode.py). Default False: eager decoding.
      join_projections: True computes each layer's q/k/v and gate/up as one matrix product each during
        the call (adakv/runtimes/hf/fusion/joined_projections.py; fewer matrix products per decode step, the same memory).
      fuse_elementwise: True runs the norms, rotary embeddings and SiLU gates as one Triton kernel each
        during the call (adakv/runtimes/hf/fusion/elementwise.py; model on CUDA).
      gemv_linears: True runs the decode steps' linear layers (1 to 16 input rows) as adakv's Triton
        matrix-vector product during the call (adakv/runtimes/hf/fusion/gemv_linears.py; model on CUDA). With
        cuda_graphs, join_projections and fuse_elementwise: the fastest decode steps.
      prefill_chunk_size: None (default) prefills the context in one forward and then compresses it;
        an int prefills it that many tokens at a time and compresses each chunk as it arrives
        (adakv.prefill_in_chunks: bounded prefill memory for long contexts; later chunks attend to
        the compressed earlier ones).
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True
    _pipeline_calls_generate = False

    def _sanitize_parameters(
        self,
        question=None,
        questions=None,
        answer_prefix="",
        press=None,
        max_new_tokens=50,
        max_context_length=None,
        cache=None,
        prefill_chunk_size=None,
        cuda_graphs=False,
        join_projections=False,
        fuse_elementwise=False,
        gemv_linears=False,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(f"Unexpected arguments for {TASK}: {sorted(kwargs)}.")
        switches = dict(cuda_graphs=cuda_graphs, join_projections=join_projections, fuse_elementwise=fuse_elementwise,
                        gemv_linears=gemv_linears)  # fmt: skip
        check_speed_switches(switches, TASK)
        preprocess = dict(
            question=question, questions=questions, answer_prefix=answer_prefix, press=press,
            max_new_tokens=max_new_tokens, max_context_length=max_context_length, cache=cache,
            prefill_chunk_size=prefill_chunk_size,
        )
        forward = dict(
            press=press, max_new_tokens=max_new_tokens, cache=cache, prefill_chunk_size=prefill_chunk_size,
            cuda_graphs=cuda_graphs, join_projections=join_projections, fuse_elementwise=fuse_elementwise,
            gemv_linears=gemv_linears,
        )  # fmt: skip
        postprocess = dict(single=questions is None)
        return preprocess, forward, postprocess

    def preprocess(self, context, question=None, questions=None, answer_prefix="", press=None,
                   max_new_tokens=50, max_context_length=None, cache=None, prefill_chunk_size=None):
        question_list = check_pipeline_inputs(
            context, question, questions, press, max_new_tokens, max_context_length, cache, prefill_chunk_size,
            answer_prefix,
        )
        context = truncate_context(self.tokenizer, context, max_context_length)
        parts = [split_prompt(self.tokenizer, context, item, answer_prefix) for item in question_list]
        context_texts = {context_text for context_text, _ in parts}
        if len(context_texts) != 1:
            raise ValueError("The chat template renders the context differently for different questions.")
        context_ids, question_ids = encode_prompt_parts(self.tokenizer, context_texts.pop(), [text for _, text in parts])
        return {"context_ids": context_ids, "question_ids": question_ids}

    def _forward(self, model_inputs, press=None, max_new_tokens=50, cache=None, prefill_chunk_size=None,
                 cuda_graphs=False, join_projections=False, fuse_elementwise=False, gemv_linears=False):
        cache = DynamicCache() if cache is None else cache
        if cuda_graphs and press is None:
            raise ValueError("cuda_graphs=True decodes over a compressed (evict) cache: pass a press too.")
        attach_tokenizer(press, self.tokenizer)  # KVzipPress encodes its repeat prompt with it
        fusions = dict(join_projections=join_projections, fuse_elementwise=fuse_elementwise, gemv_linears=gemv_linears)
        if press is not None:
            block = press(self.model, cuda_graphs=cuda_graphs, **fusions)
        else:
            block = accelerate(self.model, **fusions)
        with block:
            prefill_context(self.model, cache, model_inputs["context_ids"], press, prefill_chunk_size)
            answers = [
                answer_from_cache(self.model, self.tokenizer, cache, ids, max_new_tokens)
                for ids in model_inputs["question_ids"]
            ]
        return {"answers": answers}

    def postprocess(self, model_outputs, single=True):
        answers = model_outputs["answers"]
        return {"answer": answers[0]} if single else {"answers": answers}


def register_pipeline() -> None:
    """Make `transformers.pipeline("kv-press-text-generation", ...)` build this pipeline."""
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=KVPressTextGenerationPipeline, pt_model=AutoModelForCausalLM
    )
